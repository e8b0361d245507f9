"""Rounding midpoints on bf16 weights: lowbit's export codes against ModelOpt 0.47's, and what they cost in KL.

Two measurements of the code rule (``codes = round(x / step)``, ``step = amax / bound`` the float32 divisor the
export stores, against the older ``round(x * (bound / amax))``):

1. Exhaustive, no model: for each of the 128 bf16 mantissas m of amax in [1, 2) and every bf16 x with |x| <= m,
   how many x the two float32 rules give different codes for (E4M3 bound 448, INT4 7, INT8 127). Both rules use
   correctly rounded float32 division for the step / scale (tensor / tensor).
2. The bundled model (bf16-valued weights, kept in float32): quantized by lowbit and by ModelOpt with the same
   FP8 preset (per tensor, per channel) and calibration (16 windows of 256 tokens, ``export_vllm.py``), both
   exported as ModelOpt's unified checkpoint; the number of weight codes that differ between the two exports,
   and lowbit's in-memory model's mean per-token KL to the float model (perplexity beside it) on the first
   ``--eval-tokens`` tokens of the bundled held-out text (windows of 256, stride 128).

Run it with the lowbit to measure first on PYTHONPATH (e.g. an older commit's ``lowbit`` extracted by
``git archive``), in a venv with nvidia-modelopt:

    PYTHONPATH=$PWD:$PWD/bench <modelopt venv>/bin/python bench/code_rule_ties.py [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from export_vllm import CALIB_SAMPLES, SEQ_LEN
from safetensors.torch import load_file

import lowbit
from lowbit.data import calibration_batches, default_calibration_text, default_eval_text, make_forward_loop
from lowbit.eval.divergence import divergence
from lowbit.export import export

# FP8 only: its weight amax is max |w| on both sides, so the codes differ by the rule alone (AWQ / SmoothQuant
# searches differ between the tools; their INT grids are in the exhaustive table and tests/export).
PRESETS = ("FP8_DEFAULT_CFG", "FP8_PER_CHANNEL_PER_TOKEN_CFG")
BOUNDS = {"E4M3": 448.0, "INT4": 7.0, "INT8": 127.0}


def _codes(values: torch.Tensor, bound: float) -> torch.Tensor:
    if bound == 448.0:
        return values.clamp(-448, 448).to(torch.float8_e4m3fn).float()
    return torch.round(values).clamp(-bound - 1, bound)


def exhaustive_table() -> list[dict]:
    """Rows {format, mantissas splitting the rules, x values split (all mantissas), worst mantissa, its count}."""
    every = torch.arange(2**16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    every = every[torch.isfinite(every)]
    rows = []
    for name, bound in BOUNDS.items():
        bound_t = torch.tensor(bound)
        counts = []
        for i in range(128):
            amax = torch.tensor(1.0 + i / 128)
            x = every[every.abs() <= amax]
            by_step = _codes(x / (amax / bound_t), bound)
            by_scale = _codes(x * (bound_t / amax), bound)
            counts.append((int((by_step != by_scale).sum()), float(amax), x.numel()))
        worst = max(counts)
        rows.append({"format": name, "bf16 x per mantissa": counts[0][2],
                     "mantissas where the rules split": sum(1 for c in counts if c[0]),
                     "x values split, all 128 mantissas": sum(c[0] for c in counts),
                     "worst mantissa": worst[1], "x split there": worst[0]})
    return rows


def differing_codes(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    """(E4M3 codes that differ, codes compared, layers skipped) over the layers whose weight_scale is bit-identical
    in both exports; ModelOpt's exporter gives q/k/v and gate/up one shared per-tensor scale, lowbit's does not,
    and those layers (skipped) differ by their scale, not the rule."""
    differ = total = skipped = 0
    for key in theirs:
        if key.endswith(".weight_scale"):
            if not torch.equal(ours[key], theirs[key]):
                skipped += 1
                continue
            weight = key[: -len("_scale")]
            mine, peer = ours[weight].view(torch.uint8), theirs[weight].view(torch.uint8)
            differ += int((mine != peer).sum())
            total += peer.numel()
    return differ, total, skipped


def model_rows(eval_tokens: int) -> list[dict]:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    torch.manual_seed(0)
    float_model, tokenizer = lowbit.assets.load_default_model()
    batches = calibration_batches(tokenizer, default_calibration_text(), num_samples=CALIB_SAMPLES, seq_len=SEQ_LEN)
    forward_loop = make_forward_loop(batches, progress=False)
    rows = []
    for preset in PRESETS:
        ours = lowbit.quantize(copy.deepcopy(float_model), lowbit.get_preset(preset), forward_loop)
        theirs = mtq.quantize(copy.deepcopy(float_model), getattr(mtq, preset), forward_loop)
        with tempfile.TemporaryDirectory() as scratch:
            export(ours, Path(scratch) / "lowbit", "hf")
            export_hf_checkpoint(theirs, export_dir=Path(scratch) / "modelopt")
            differ, total, skipped = differing_codes(load_file(f"{scratch}/lowbit/model.safetensors"),
                                            load_file(f"{scratch}/modelopt/model.safetensors"))
        with torch.no_grad():
            result = divergence(ours, float_model, tokenizer, default_eval_text(), seq_len=256, stride=128,
                                max_tokens=eval_tokens, progress=False)
        rows.append({"preset": preset, "codes differing from ModelOpt": differ, "codes": total,
                     "layers with another scale (not compared)": skipped,
                     "mean KL to float": round(result.mean_kl, 6), "perplexity": round(result.perplexity, 4),
                     "float perplexity": round(result.reference_perplexity, 4), "tokens": result.tokens})
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    import modelopt

    started = time.time()
    table = exhaustive_table()
    for row in table:
        print(row)
    rows = model_rows(args.eval_tokens)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"lowbit": str(Path(lowbit.__file__).parent), "commit": commit, "torch": torch.__version__,
            "modelopt": modelopt.__version__, "python": platform.python_version(), "machine": platform.processor(),
            "command": " ".join(sys.argv), "seconds": round(time.time() - started, 1),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "exhaustive": table, "bundled": rows}, indent=2) + "\n")
    print(meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
