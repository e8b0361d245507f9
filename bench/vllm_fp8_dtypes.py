"""How far apart are vLLM CPU and lowbit on FP8 per-token, per engine dtype, and how far is vLLM from itself?

Case: the bundled model quantized with FP8_PER_CHANNEL_PER_TOKEN_CFG and calibrated as in ``export_vllm.py``,
exported both as compressed-tensors and as ModelOpt's unified HF format. vLLM (``enforce_eager``) runs each
export in every dtype it accepts for it: compressed-tensors in float32, float16 and bfloat16; ModelOpt in float16
and bfloat16 only (``ModelOptFp8Config.get_supported_act_dtypes``: "torch.float32 is not supported for
quantization method modelopt"). On the lowbit side, each in float32, float16 and bfloat16 (``model.to(dtype)``):

- lowbit's fake-quantized model: ModelOpt's numerics (``modelopt/torch/quantization/tensor_quant.py``
  ``_fp8_eager``): codes = e4m3(clamp(float32(x) * (448 / amax), -448, 448)), dequantized operands, a float GEMM;
- the vLLM-arithmetic reference of ``vllm_fp8_numerics.py`` (``ReferenceFp8Linear`` with vLLM's rule, GEMM on
  the export's codes, then s_x * s_w in float32, then the engine dtype: ``QuantFP8.forward_native`` +
  ``ChannelWiseTorchFP8ScaledMMLinearKernel``) swapped into the float model, everything else transformers' Llama.

Reported: mean |d log p| over the 128 held-out tokens of ``export_vllm.py`` between every lowbit-side model
and every vLLM run, and between the vLLM runs themselves (the engine against itself in another dtype); and, at
layer 0, the fraction of E4M3 activation codes (vLLM's rule) that differ between vLLM's input to each linear and
the vLLM-arithmetic reference's in the same dtype (where the two first part).

    PYTHONPATH=$PWD:$PWD/bench /work/venvs/<vllm venv>/bin/python bench/vllm_fp8_dtypes.py [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # apply_model's hooks then run in this process

import torch
from export_vllm import lowbit_logprobs
from safetensors.torch import load_file
from vllm_fp8_numerics import (
    code_flips,
    fp8_per_token_model,
    linear_inputs,
    mean_abs,
    reference_model,
    vllm_codes,
    vllm_run,
)

from lowbit.export import export

FORMATS = {"compressed-tensors": "compressed-tensors", "modelopt": "hf"}
RUNS = [("compressed-tensors", "float32"), ("compressed-tensors", "float16"), ("compressed-tensors", "bfloat16"),
        ("modelopt", "float16"), ("modelopt", "bfloat16")]
DTYPES = ("float32", "float16", "bfloat16")


def lowbit_side(model, float_model, tensors: dict, ids: list[int]) -> tuple[dict, dict]:
    """({name: log-probabilities}, {dtype: the vLLM-arithmetic reference's inputs per linear}) of the float
    model, lowbit's fake-quantized model and the vLLM-arithmetic reference, the last two in each dtype."""
    scored, reference_inputs = {"float model, float32": lowbit_logprobs(float_model, ids)}, {}
    reference = reference_model(float_model, tensors, vllm_codes, gemm_on_codes=True)
    for dtype in DTYPES:
        scored[f"lowbit fake quant, {dtype}"] = lowbit_logprobs(model, ids, getattr(torch, dtype))
        converted = copy.deepcopy(reference).to(getattr(torch, dtype))
        scored[f"vLLM-arithmetic reference, {dtype}"], reference_inputs[dtype] = linear_inputs(converted, ids)
    return scored, reference_inputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    import vllm

    float_model, tokenizer, model, ids = fp8_per_token_model()
    runs, run_inputs = {}, {}
    with tempfile.TemporaryDirectory() as workdir:
        directories = {name: export(model, Path(workdir) / name, target, tokenizer=tokenizer)
                       for name, target in FORMATS.items()}
        tensors = load_file(directories["compressed-tensors"] / "model.safetensors")
        for name, dtype in RUNS:
            key = f"vLLM {name}, {dtype}"
            runs[key], run_inputs[key] = vllm_run(directories[name], ids, dtype)
    scored, reference_inputs = lowbit_side(model, float_model, tensors, ids)
    scored.update(runs)
    distances = {row: {column: mean_abs(lp, runs[column]) for column in runs} for row, lp in scored.items()}
    flips = {key: {site: value for (layer, site), value in
                   code_flips(run_inputs[key], reference_inputs[key.rsplit(", ", 1)[1]]).items() if layer == 0}
             for key in runs}
    print(f"{'mean |d log p| (nats)':36s}", *[f"{column[5:]:>28s}" for column in runs])
    for row, table in distances.items():
        print(f"{row:36s}", *[f"{value:28.4f}" for value in table.values()])
    print("layer 0: share of activation codes differing, vLLM vs the vLLM-arithmetic reference in the same dtype")
    for key, table in flips.items():
        print(f"{key:36s}", " ".join(f"{site} {value:.2e}" for site, value in table.items()))
    if args.json:
        context = {"vllm": vllm.__version__, "torch": torch.__version__, "python": platform.python_version(),
                   "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M")}
        Path(args.json).write_text(json.dumps({**context, "mean_abs_logprob": distances,
                                              "layer0_code_flips": flips}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
