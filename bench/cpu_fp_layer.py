"""One FP8 / NVFP4 layer on the CPU: the ways to multiply by its codes, side by side with bf16 ``nn.Linear``.

    python bench/cpu_fp_layer.py --out bench/results      # writes bench/results/cpu_fp_layer_<date>.md

Shapes (N, K) 5632 x 2048 and 2048 x 5632 (a 2048-wide Llama's MLP), M = 1 (decoding), 4 (the most rows the C kernel
takes), 16 (a short prompt) and 256 (prefill); weights normal with 1 % x40 outliers, fixed seed, bf16 activations.
Options:

- ``bf16 linear``: ``F.linear`` on the bf16 weight (the baseline);
- ``fp8 _scaled_mm``: torch's CPU ``torch._scaled_mm`` on E4M3 activation and weight codes, per-tensor scales;
- ``fp8 .to(bf16) + linear``: torch's elementwise float8 cast of the codes each call, then ``F.linear``;
- ``fp8 / nvfp4 dequantize + linear``: ``PackedWeight.dequantize`` (lookup tables) each call, then ``F.linear``
  (lowbit's path before this bench);
- ``fp8 / nvfp4 inductor fused``: ``torch.compile`` (Inductor, C++ codegen) of decode + multiply + sum over K
  (M = 1 only; needs a compiler at run time);
- ``fp8 / nvfp4 lowbit C kernel``: ``lowbit.kernels.cpu_fp`` (codes decoded in registers; M <= 4);
- ``fp8 / nvfp4 C dequantize + linear``: ``cpu_fp.dequantized`` (the bf16 weight in one C pass), ``F.linear``;
- ``compressed ... layer``: the ``CompressedLinear`` compress() builds (presets W4A16_NVFP4, FP8_DEFAULT with and
  without its activation quantizer), i.e. the kernel plus the layer's per-call work.

Each option runs ``--repeats`` rounds, interleaved (every option once per round, so load falls on all alike);
the table gives the median ms and ``x bf16`` = bf16's median / the option's, and the fastest call of each
(``best``: on a shared machine the least disturbed one) with its ratio to bf16's fastest. ``rel. err`` = relative
Frobenius error to the float64 product of the format's values (``_scaled_mm``: of the activation and weight codes).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).parent))

import lowbit  # noqa: E402
from lowbit.compress import compress  # noqa: E402
from lowbit.compress.packed import WeightFormat, quantize_weight  # noqa: E402
from lowbit.eval import format_table  # noqa: E402
from lowbit.kernels import cpu_fp  # noqa: E402

SHAPES = [(5632, 2048), (2048, 5632)]
ROWS = [1, 4, 16, 256]
SEED = 0


def fp8_fused(x, codes, scale):
    return ((x.float() * codes.float()).sum(-1) / scale).to(x.dtype)


def nvfp4_fused(x, codes, block_scale, table):
    n = codes.shape[0]
    lo, hi = table[(codes & 15).int()], table[(codes >> 4).int()]
    pairs = lo * x.float()[:, 0::2] + hi * x.float()[:, 1::2]
    return (pairs.view(n, -1, 8).sum(-1) * block_scale).sum(-1).to(x.dtype).unsqueeze(0)


def weight(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    w = torch.randn(shape, generator=generator) * 0.02
    return torch.where(torch.rand(shape, generator=generator) < 0.01, w * 40, w)


def layer(w: torch.Tensor, preset: str, weight_only: bool, x: torch.Tensor) -> nn.Module:
    module = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        module.weight.copy_(w)
    config = copy.deepcopy(getattr(lowbit, preset))
    if weight_only:
        config["quant_cfg"]["*input_quantizer"] = {"enable": False}
    return compress(lowbit.quantize(nn.Sequential(module).to(torch.bfloat16), config, lambda m: m(x)))


def options(w: torch.Tensor, x: torch.Tensor, inductor: bool) -> dict:
    """{name: (function, float64 reference or None)} for one shape and x."""
    bf16 = w.to(torch.bfloat16)
    fp8 = quantize_weight(w, WeightFormat("float", (4, 3)))
    nvfp4 = quantize_weight(w, WeightFormat("nvfp4", (2, 1), block_size=16))
    fp8_ref = x.double() @ fp8.dequantize(torch.float64).T
    nvfp4_ref = x.double() @ nvfp4.dequantize(torch.float64).T
    x_scale = 448.0 / x.float().abs().amax()
    x_codes = (x.float() * x_scale).to(torch.float8_e4m3fn)
    inverse_w, inverse_x = fp8.scale.float().reciprocal().reshape(()), x_scale.reciprocal().reshape(())
    codes_ref = (x_codes.double() @ fp8.codes.double().T) * inverse_w.double() * inverse_x.double()
    found = {
        "bf16 linear": (lambda: F.linear(x, bf16), x.double() @ w.to(torch.bfloat16).double().T),
        "fp8 _scaled_mm": (lambda: torch._scaled_mm(x_codes, fp8.codes.t(), scale_a=inverse_x, scale_b=inverse_w,
                                                    out_dtype=torch.bfloat16), codes_ref),
        "fp8 .to(bf16) + linear": (lambda: F.linear(x, (fp8.codes.to(torch.bfloat16) / fp8.scale.to(torch.bfloat16))),
                                   fp8_ref),
        "fp8 dequantize + linear": (lambda: F.linear(x, fp8.dequantize(torch.bfloat16)), fp8_ref),
        "nvfp4 dequantize + linear": (lambda: F.linear(x, nvfp4.dequantize(torch.bfloat16)), nvfp4_ref),
    }
    if cpu_fp.available():
        fp8_operands, nvfp4_operands = cpu_fp.fp8_operands(fp8), cpu_fp.nvfp4_operands(nvfp4)
        found["fp8 C dequantize + linear"] = (
            lambda: F.linear(x, cpu_fp.dequantized(fp8, fp8_operands, torch.bfloat16)), fp8_ref)
        found["nvfp4 C dequantize + linear"] = (
            lambda: F.linear(x, cpu_fp.dequantized(nvfp4, nvfp4_operands, torch.bfloat16)), nvfp4_ref)
    if x.shape[0] <= cpu_fp.GEMV_MAX_ROWS and cpu_fp.available():
        found["fp8 lowbit C kernel"] = (lambda: cpu_fp.fp8_rows(x, *fp8_operands), fp8_ref)
        found["nvfp4 lowbit C kernel"] = (lambda: cpu_fp.nvfp4_rows(x, *nvfp4_operands), nvfp4_ref)
    if inductor and x.shape[0] == 1:
        fused8, fused4 = torch.compile(fp8_fused), torch.compile(nvfp4_fused)
        block_scale = nvfp4.scale.float() * nvfp4.global_scale.float()
        table = lowbit.formats.decode_e2m1(torch.arange(16)).float()
        found["fp8 inductor fused"] = (lambda: fused8(x, fp8.codes, fp8.scale.float().reshape(())), fp8_ref)
        found["nvfp4 inductor fused"] = (lambda: fused4(x, nvfp4.codes, block_scale, table), nvfp4_ref)
    for name, preset, weight_only in [("compressed nvfp4 wo layer", "W4A16_NVFP4_CFG", True),
                                      ("compressed fp8 wo layer", "FP8_DEFAULT_CFG", True),
                                      ("compressed fp8 w8a8 layer", "FP8_DEFAULT_CFG", False)]:
        module = layer(w, preset, weight_only, x)  # quantized from the bf16 weight: its own reference
        reference = x.double() @ module[0].dequantized_weight(torch.float64).T if weight_only else None
        found[name] = (lambda module=module: module(x), reference)
    return found


def measure(shape, m, repeats, inductor, generator) -> list[dict]:
    w = weight(shape, generator)
    x = torch.randn(m, shape[1], generator=generator).to(torch.bfloat16)
    found = options(w, x, inductor)
    errors, times = {}, {name: [] for name in found}
    with torch.inference_mode():
        for name, (function, reference) in found.items():
            out = function()
            if reference is not None:
                errors[name] = ((out.double().reshape(reference.shape) - reference).norm() / reference.norm()).item()
            function()
        for _ in range(repeats):
            for name, (function, _) in found.items():
                started = time.perf_counter()
                function()
                times[name].append(time.perf_counter() - started)
    base, base_best = statistics.median(times["bf16 linear"]), min(times["bf16 linear"])
    rows = []
    for name in found:
        median, best = statistics.median(times[name]), min(times[name])
        rows.append({"N x K": f"{shape[0]} x {shape[1]}", "M": m, "option": name, "ms": round(median * 1e3, 3),
                     "x bf16": round(base / median, 2), "best ms": round(best * 1e3, 3),
                     "best x bf16": round(base_best / best, 2),
                     "rel. err": f"{errors[name]:.1e}" if name in errors else ""})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-inductor", action="store_true", help="skip the torch.compile options")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(SEED)
    rows = [row for shape in SHAPES for m in ROWS
            for row in measure(shape, m, args.repeats, not args.no_inductor, generator)]
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    lines = [f"Command: `python bench/cpu_fp_layer.py {' '.join(sys.argv[1:])}`  ",
             f"Device: {platform.processor() or platform.machine()}; {torch.get_num_threads()} threads; torch "
             f"{torch.__version__}; lowbit C kernel: {cpu_fp.available()}  ",
             f"Load (uptime, at the end): {load}  ",
             f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             "", "```", format_table(rows), "```"]
    print("\n".join(lines))
    if args.out is not None:
        path = args.out / f"cpu_fp_layer_{datetime.date.today()}.md"
        path.write_text("# One FP8 / NVFP4 layer on the CPU\n\n" + "\n".join(lines) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
