"""Does ModelOpt's own FP8 per-token export, run in vLLM CPU, agree with ModelOpt's own in-memory model?

The peer's answer to the 0.05-nat question of ``export_vllm.py`` on the same model and prompt. Two stages, as
ModelOpt and vLLM live in different virtual environments here:

1. ``--stage quantize`` (Python with nvidia-modelopt): the bundled model quantized with
   FP8_PER_CHANNEL_PER_TOKEN_CFG by ModelOpt (``mtq.quantize``) and by lowbit, the same 16 calibration windows
   of 256 tokens (``export_vllm.py``); the 128 held-out log-probabilities of both in-memory models in float32
   and bfloat16 and of the float model; ModelOpt's ``export_hf_checkpoint`` and lowbit's ``export(.., "hf")``
   written to ``--dir``.
2. ``--stage vllm`` (Python with vllm): vLLM (``enforce_eager``) runs both exports in bfloat16 and float16,
   the dtypes its ModelOpt loader takes, and the table of mean |d log p| between every in-memory model and every
   vLLM run is printed (and written with ``--json``).

    PYTHONPATH=$PWD:$PWD/bench <modelopt venv>/bin/python bench/vllm_fp8_modelopt_peer.py --stage quantize --dir D
    PYTHONPATH=$PWD:$PWD/bench <vllm venv>/bin/python bench/vllm_fp8_modelopt_peer.py --stage vllm --dir D \
        [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch
from export_vllm import CALIB_SAMPLES, SEQ_LEN, lowbit_logprobs, prompt_ids

import lowbit
from lowbit.data import calibration_batches, default_calibration_text, make_forward_loop
from lowbit.export import export

VLLM_DTYPES = ("bfloat16", "float16")
IN_MEMORY = "in_memory.json"
EXPORTS = {"modelopt": "ModelOpt", "lowbit": "lowbit"}  # folder under --dir: label


def quantize_stage(directory: Path) -> dict:
    """Both in-memory models' log-probabilities ({name: list}) and both exports under ``directory``."""
    import modelopt
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    torch.manual_seed(0)
    float_model, tokenizer = lowbit.assets.load_default_model()
    batches = calibration_batches(tokenizer, default_calibration_text(), num_samples=CALIB_SAMPLES, seq_len=SEQ_LEN)
    forward_loop = make_forward_loop(batches, progress=False)
    ids = prompt_ids(tokenizer)
    ours = lowbit.quantize(copy.deepcopy(float_model), lowbit.get_preset("FP8_PER_CHANNEL_PER_TOKEN_CFG"),
                           forward_loop)
    theirs = mtq.quantize(copy.deepcopy(float_model), mtq.FP8_PER_CHANNEL_PER_TOKEN_CFG, forward_loop)
    scored = {"float model, float32": lowbit_logprobs(float_model, ids)}
    for dtype in ("float32", "bfloat16"):
        scored[f"lowbit in memory, {dtype}"] = lowbit_logprobs(ours, ids, getattr(torch, dtype))
        scored[f"ModelOpt in memory, {dtype}"] = lowbit_logprobs(theirs, ids, getattr(torch, dtype))
    export(ours, directory / "lowbit", "hf", tokenizer=tokenizer, overwrite=True)
    with torch.no_grad():
        export_hf_checkpoint(theirs, export_dir=str(directory / "modelopt"))
    tokenizer.save_pretrained(directory / "modelopt")
    result = {"modelopt": modelopt.__version__, "ids": ids,
              "logprobs": {name: values.tolist() for name, values in scored.items()}}
    (directory / IN_MEMORY).write_text(json.dumps(result))
    return result


def vllm_stage(directory: Path) -> dict:
    """{row: {vLLM run: mean |d log p|}} for the in-memory models and the vLLM runs of both exports."""
    from vllm_fp8_numerics import mean_abs, vllm_run

    saved = json.loads((directory / IN_MEMORY).read_text())
    scored = {name: torch.tensor(values, dtype=torch.float64) for name, values in saved["logprobs"].items()}
    runs = {f"vLLM {label}'s export, {dtype}": vllm_run(directory / source, saved["ids"], dtype)[0]
            for source, label in EXPORTS.items() for dtype in VLLM_DTYPES}
    scored.update(runs)
    return {row: {column: mean_abs(lp, runs[column]) for column in runs} for row, lp in scored.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("quantize", "vllm"), required=True)
    parser.add_argument("--dir", type=Path, required=True, help="where stage 1 writes and stage 2 reads")
    parser.add_argument("--json", help="stage vllm: write the table as JSON here")
    args = parser.parse_args(argv)
    if args.stage == "quantize":
        args.dir.mkdir(parents=True, exist_ok=True)
        quantize_stage(args.dir)
        return 0
    import vllm

    table = vllm_stage(args.dir)
    columns = list(next(iter(table.values())))
    print(f"{'mean |d log p| (nats)':30s}", *[f"{column[5:]:>26s}" for column in columns])
    for row, values in table.items():
        print(f"{row:30s}", *[f"{values[column]:26.4f}" for column in columns])
    if args.json:
        saved = json.loads((args.dir / IN_MEMORY).read_text())
        context = {"vllm": vllm.__version__, "modelopt": saved["modelopt"], "torch": torch.__version__,
                   "python": platform.python_version(), "command": " ".join(sys.argv),
                   "date": time.strftime("%Y-%m-%d %H:%M")}
        Path(args.json).write_text(json.dumps({**context, "mean_abs_logprob": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
