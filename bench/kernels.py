"""Benchmark lowbit's matmul kernels against bf16 cuBLAS, torch's tinygemm and torch._scaled_mm.

    python bench/kernels.py --out bench/results/kernels_h100.md

For each weight K x N (a Linear with in_features K, out_features N) and each M (rows of x): fresh
random bf16 data (normal, 0.1% of weights x20 outliers), the median time of ``triton.testing.do_bench``
(L2 flushed before every run) and the error ``||y - y_ref|| / ||y_ref||`` against a float64 product of
the *same operands* (the bf16 weight, or each format's dequantized weight and activation codes), so the
error column shows the kernel's arithmetic, not the quantization error. Speedups are bf16 time over
the kernel's time, in the same run. Prints a table and writes it (with device and versions) to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowbit.compress.packed import WeightFormat, quantize_weight  # noqa: E402
from lowbit.kernels import dispatch, fp8_matmul, int8_matmul, weight_only_linear  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]  # (K, N)
ROWS = [1, 4, 16, 64, 256, 2048]
FORMATS = {
    "int4 g128": WeightFormat("int", 4, block_size=128),
    "int4-asym g128": WeightFormat("int_asym", 4, block_size=128),
    "nvfp4": WeightFormat("nvfp4", (2, 1), block_size=16),
}
FP8_MAX = 448.0
GROUP = 128


def random_matrix(rows: int, cols: int, generator: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    values = torch.randn(rows, cols, generator=generator, device="cuda") * scale
    outliers = torch.rand(rows, cols, generator=generator, device="cuda") < 1e-3
    return torch.where(outliers, values * 20, values).to(torch.bfloat16)


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.double() - reference).norm() / reference.norm()).item()


def median_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def tinygemm_operands(weight: torch.Tensor):
    """torch's int4 tinygemm layout for ``weight``: (packed, scales_and_zeros, dequantized weight)."""
    n, k = weight.shape
    groups = weight.float().reshape(n, k // GROUP, GROUP)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((high - low).clamp(min=1e-6) / 15).to(torch.bfloat16).float()
    zero = (low + 8 * scale).to(torch.bfloat16).float()  # tinygemm: w = (q - 8) * scale + zero
    codes = ((groups - low) / scale).round().clamp(0, 15)
    dequantized = ((codes - 8) * scale + zero).reshape(n, k)
    codes = codes.reshape(n, k).to(torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack((codes[:, ::2] << 4) | codes[:, 1::2], 8)
    scales_and_zeros = torch.stack([scale, zero], -1).reshape(n, k // GROUP, 2).transpose(0, 1)
    return packed, scales_and_zeros.to(torch.bfloat16).contiguous(), dequantized


def fp8_codes(values: torch.Tensor, rowwise: bool):
    """(codes, scale) with lowbit's convention x_hat = codes / scale (per tensor or per row)."""
    amax = values.float().abs().amax(dim=1, keepdim=True) if rowwise else values.float().abs().amax().reshape(1, 1)
    scale = FP8_MAX / amax
    return (values.float() * scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def int8_codes(values: torch.Tensor):
    scale = 127.0 / values.float().abs().amax(dim=1, keepdim=True)
    return (values.float() * scale).round().clamp(-127, 127).to(torch.int8), scale


def bench_shape(k: int, n: int, rows: list[int], generator: torch.Generator) -> list[dict]:
    weight = random_matrix(n, k, generator, scale=0.02)
    packed = {name: quantize_weight(weight, fmt) for name, fmt in FORMATS.items()}
    operands = {
        "weight": weight,
        "packed": packed,
        "dequantized": {name: p.dequantize(torch.bfloat16).double() for name, p in packed.items()},
        "tinygemm": tinygemm_operands(weight),
        "fp8 tensor": fp8_codes(weight, rowwise=False),
        "fp8 row": fp8_codes(weight, rowwise=True),
        "int8 row": int8_codes(weight),
    }
    results = []
    for m in rows:
        row = {"K": k, "N": n, "M": m, **bench_row(random_matrix(m, k, generator), operands)}
        results.append(row)
        base = row["bf16 cuBLAS"]["ms"]
        summary = "  ".join(f"{name.replace('lowbit ', '')}={base / v['ms']:.2f}x" for name, v in row.items()
                            if isinstance(v, dict) and name != "bf16 cuBLAS")
        print(f"K={k} N={n} M={m} bf16={base * 1e3:.1f}us  {summary}", flush=True)
    return results


def bench_row(x: torch.Tensor, operands: dict) -> dict:
    """{column: {"ms", "err"}} for one activation batch ``x`` (M, K) against every kernel."""
    kernels = dispatch.triton_w4()
    x64 = x.double()
    row = {}

    def record(name, fn, reference):
        try:
            out = fn()
            torch.cuda.synchronize()
            row[name] = {"ms": median_ms(fn), "err": relative_error(out, reference)}
        except Exception as error:  # keep the other columns when one kernel fails; the table says so
            print(f"{name} failed at M={x.shape[0]}: {error!r}", flush=True)

    weight = operands["weight"]
    record("bf16 cuBLAS", lambda: F.linear(x, weight), x64 @ weight.double().T)
    for name, p in operands["packed"].items():
        arguments = dispatch.triton_arguments(p)
        reference = x64 @ operands["dequantized"][name].T
        record(f"lowbit {name}", lambda p=p, a=arguments: kernels.w4_matmul(x, p.codes, p.scale, **a), reference)
        if x.shape[0] >= 64:
            record(f"lowbit {name} dq+cuBLAS",
                   lambda p=p, a=arguments: F.linear(x, kernels.w4_dequantize(p.codes, p.scale, dtype=x.dtype, **a)),
                   reference)
        record(f"dispatch {name}", lambda p=p: weight_only_linear(x, p, None), reference)
    tiny_packed, tiny_scales, tiny_weight = operands["tinygemm"]
    record("tinygemm int4 g128", lambda: torch.ops.aten._weight_int4pack_mm(x, tiny_packed, GROUP, tiny_scales),
           x64 @ tiny_weight.double().T)
    for name, rowwise in (("fp8 tensor", False), ("fp8 row", True)):
        w_codes, w_scale = operands[name]
        x_codes, x_scale = fp8_codes(x, rowwise)
        reference = (x_codes.double() / x_scale.double()) @ (w_codes.double() / w_scale.double()).T
        record(f"scaled_mm {name}",
               lambda xc=x_codes, xs=x_scale, wc=w_codes, ws=w_scale: fp8_matmul(xc, xs, wc, ws, None, torch.bfloat16),
               reference)
        record(f"lowbit {name} +dyn act quant",
               lambda r=rowwise, wc=w_codes, ws=w_scale: fp8_matmul(*fp8_codes(x, r), wc, ws, None, torch.bfloat16),
               reference)
    w_codes, w_scale = operands["int8 row"]
    x_codes, x_scale = int8_codes(x)
    reference = (x_codes.double() / x_scale.double()) @ (w_codes.double() / w_scale.double()).T
    record("int_mm int8 row", lambda: int8_matmul(x_codes, x_scale, w_codes, w_scale, None, torch.bfloat16), reference)
    return row


def environment() -> dict:
    import triton

    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        driver = "unknown"
    return {"device": torch.cuda.get_device_name(), "driver": driver, "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python " + " ".join(sys.argv)}


def markdown(results: list[dict], env: dict) -> str:
    columns = [c for c in results[0] if c not in ("K", "N", "M")]
    for row in results[1:]:
        columns += [c for c in row if c not in columns and c not in ("K", "N", "M")]
    lines = ["# lowbit kernel benchmark", ""]
    lines += [f"- {key}: {value}" for key, value in env.items() if key != "autotuned configs"]
    lines += ["- time: median of triton.testing.do_bench (warmup 25 ms, rep 100 ms, L2 flushed), in us",
              "- speedup: bf16 cuBLAS time / kernel time, same run; err: ||y - y64|| / ||y64|| against a float64",
              "  product of the same operands (dequantized weight; activation codes for W8A8)",
              "- dispatch: lowbit.kernels.weight_only_linear as the library calls it", ""]
    lines += ["| K x N | M | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for row in results:
        base = row["bf16 cuBLAS"]["ms"]
        cells = []
        for column in columns:
            value = row.get(column)
            if value is None:
                cells.append("-")
                continue
            error = f", err {value['err']:.1e}"
            ratio = "" if column == "bf16 cuBLAS" else f" ({base / value['ms']:.2f}x)"
            cells.append(f"{value['ms'] * 1e3:.1f}{ratio}{error}")
        lines.append(f"| {row['K']}x{row['N']} | {row['M']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/kernels_h100.md"))
    parser.add_argument("--rows", type=int, nargs="*", default=ROWS)
    parser.add_argument("--shapes", type=int, nargs="*", default=None, help="indices into SHAPES")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/kernels.py needs a CUDA GPU")
    generator = torch.Generator(device="cuda").manual_seed(0)
    shapes = SHAPES if args.shapes is None else [SHAPES[i] for i in args.shapes]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    env = environment()
    results = []
    for k, n in shapes:
        results += bench_shape(k, n, args.rows, generator)
        torch.cuda.empty_cache()
        args.out.write_text(markdown(results, env))  # written after every shape: a cut run keeps its rows
    env["autotuned configs"] = autotune_choices()
    text = markdown(results, env)
    print(text)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"environment": env, "results": results}, indent=1))


def autotune_choices() -> dict:
    """Autotuner key -> chosen config of each lowbit Triton kernel (for the record)."""
    kernels = dispatch.triton_w4()
    return {name: {str(key): str(config) for key, config in tuner.cache.items()}
            for name, tuner in (("gemv", kernels._gemv_tuned), ("matmul", kernels._matmul_tuned))}


if __name__ == "__main__":
    main()
