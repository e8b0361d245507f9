"""Benchmark lowbit's matmul kernels against bf16 cuBLAS, torch's tinygemm and torch._scaled_mm.

    python bench/kernel_speed.py --out bench/results/kernels_h100.md          # the table
    python bench/kernel_speed.py --explore --out explore.md                   # launch configurations

For each weight K x N (a Linear with in_features K, out_features N) and each M (rows of x): fresh random
bf16 data (normal, 0.1% of weights x20 outliers), the GPU time of the call (captured once in a CUDA graph,
the graph's replay timed by ``triton.testing.do_bench`` with L2 flushed before every run: host launch
overhead, which dominates small shapes, stays out; the host time per call is printed separately) and the
error ``||y - y_ref|| / ||y_ref||`` against a float64 product of the *same operands* (each format's
dequantized weight, the activation codes for W8A8), so the error column shows the kernel's arithmetic, not
the quantization error. Speedups are bf16 time over the kernel's time,
in the same run. Prints a table and writes it (with device and versions) to --out.
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
from lowbit.kernels import Fp8Weight, dispatch, fp8_linear, fp8_matmul, int8_matmul, weight_only_linear  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]  # (K, N)
ROWS = [1, 4, 16, 64, 256, 2048]
FORMATS = {
    "int4 g128": WeightFormat("int", 4, block_size=128),
    "int4-asym g128": WeightFormat("int_asym", 4, block_size=128),
    "nvfp4": WeightFormat("nvfp4", (2, 1), block_size=16),
}
FP8_MAX = 448.0
GROUP = 128
EXPLORE_SHAPE = (8192, 28672)
EXPLORE_DECODE_ROWS = [1, 4, 16]
EXPLORE_PREFILL_ROWS = [256, 2048]


def matmul_configs() -> dict[str, dict]:
    """Weight-tile rows, split-K, steps per loop iteration (UNROLL: 64 * UNROLL contiguous bytes of each weight
    row per iteration), warps and pipeline depth of the tensor-core kernel, for --explore (M <= 16): 4 warps on
    128 rows use wgmma, 1-2 warps on 32-64 rows mma.sync."""
    def config(block_n, split_k, unroll, warps, stages):
        return dict(BLOCK_N=block_n, BLOCK_M=16, SPLIT_K=split_k, UNROLL=unroll, num_warps=warps, num_stages=stages,
                    X_PERMUTED=True)
    shapes = [(128, 8, 1, 4, 3), (128, 8, 2, 4, 3), (128, 4, 2, 4, 3), (128, 4, 4, 4, 2), (64, 8, 2, 2, 3),
              (64, 4, 2, 2, 3), (64, 4, 4, 2, 2), (32, 4, 4, 1, 3)]
    return {f"n{n} k{k} u{u} w{w} s{s}": config(n, k, u, w, s) for n, k, u, w, s in shapes}


def gemv_configs() -> dict[str, dict]:
    """Row tiles, split-K, UNROLL, warps and pipeline depth of the CUDA-core GEMV (M = 1), for --explore."""
    def config(block_n, split_k, unroll, warps, stages):
        return dict(BLOCK_N=block_n, SPLIT_K=split_k, UNROLL=unroll, num_warps=warps, num_stages=stages)
    shapes = [(64, 2, 1, 4, 3), (64, 2, 4, 4, 3), (32, 4, 4, 2, 3), (64, 4, 8, 2, 2), (32, 2, 8, 1, 3),
              (128, 2, 4, 4, 2), (16, 4, 8, 1, 3), (64, 1, 8, 4, 2)]
    return {f"n{n} k{k} u{u} w{w} s{s}": config(n, k, u, w, s) for n, k, u, w, s in shapes}


def dequantize_configs() -> dict[str, dict]:
    """Rows per program, K blocks of 128 per program and warps of the dequantize kernel, for --explore."""
    shapes = [(32, 1, 4), (64, 1, 8), (16, 4, 4), (8, 8, 2), (8, 16, 4), (32, 4, 8)]
    return {f"n{n} kb{kb} w{w}": dict(BLOCK_N=n, K_BLOCKS=kb, num_warps=w) for n, kb, w in shapes}


def random_matrix(rows: int, cols: int, generator: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    values = torch.randn(rows, cols, generator=generator, device="cuda") * scale
    outliers = torch.rand(rows, cols, generator=generator, device="cuda") < 1e-3
    return torch.where(outliers, values * 20, values).to(torch.bfloat16)


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.double() - reference).norm() / reference.norm()).item()


def median_ms(fn) -> float:
    """GPU time of ``fn`` (already run once): its launches captured in a CUDA graph whose replay
    ``do_bench`` times, L2 flushed before each replay; host launch overhead (Python, Triton's launcher)
    stays out. Falls back to timing ``fn`` itself when it cannot be captured."""
    import triton.testing

    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as error:
        print(f"not captured ({error!r}): timing the eager calls", flush=True)
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    return triton.testing.do_bench(graph.replay, warmup=25, rep=100, return_mode="median")


def host_us(fn, calls: int = 200) -> float:
    """Host time per call of ``fn`` (launch overhead), the GPU queue kept busy meanwhile."""
    import time

    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


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


def shape_operands(k: int, n: int, generator: torch.Generator) -> dict:
    weight = random_matrix(n, k, generator, scale=0.02)
    packed = {name: quantize_weight(weight, fmt) for name, fmt in FORMATS.items()}
    return {
        "weight": weight,
        "packed": packed,
        "dequantized": {name: p.dequantize(torch.bfloat16).double() for name, p in packed.items()},
        "tinygemm": tinygemm_operands(weight),
        "fp8 tensor": fp8_codes(weight, rowwise=False),
        "fp8 row": fp8_codes(weight, rowwise=True),
        "int8 row": int8_codes(weight),
    }


class Row:
    """{column: {"ms", "err"}} of one activation batch; ``record`` keeps going when one kernel fails."""

    def __init__(self, x: torch.Tensor):
        self.x = x
        self.x64 = x.double()
        self.values: dict[str, dict] = {}

    def record(self, name: str, fn, reference: torch.Tensor, host: bool = False) -> None:
        try:
            out = fn()
            torch.cuda.synchronize()
            self.values[name] = {"ms": median_ms(fn), "err": relative_error(out, reference)}
            if host:
                self.values[name]["host_us"] = host_us(fn)
        except Exception as error:  # the table says "-" and the log says why
            print(f"{name} failed at M={self.x.shape[0]}: {error!r}", flush=True)


def bench_row(x: torch.Tensor, operands: dict) -> dict:
    """Every kernel of the table on one activation batch ``x`` (M, K)."""
    kernels = dispatch.triton_w4()
    row = Row(x)
    weight = operands["weight"]
    row.record("bf16 cuBLAS", lambda: F.linear(x, weight), row.x64 @ weight.double().T, host=True)
    for name, p in operands["packed"].items():
        reference = row.x64 @ operands["dequantized"][name].T
        row.record(f"lowbit {name}", lambda p=p: weight_only_linear(x, p, None), reference, host=True)
        if name == "int4 g128" and x.shape[0] >= 64:  # the path dispatch does not take at this M
            arguments = dispatch.triton_arguments(p)
            if x.shape[0] >= dispatch.DEQUANTIZE_FIRST_ROWS:
                row.record(f"lowbit {name} fused", lambda p=p, a=arguments:
                           kernels.w4_matmul(x, p.codes, p.scale, **a), reference)
            else:
                row.record(f"lowbit {name} dq+cuBLAS", lambda p=p, a=arguments:
                           F.linear(x, kernels.w4_dequantize(p.codes, p.scale, dtype=x.dtype, **a)), reference)
    tiny_packed, tiny_scales, tiny_weight = operands["tinygemm"]
    row.record("tinygemm int4 g128", lambda: torch.ops.aten._weight_int4pack_mm(x, tiny_packed, GROUP, tiny_scales),
               row.x64 @ tiny_weight.double().T)
    bench_fp8(row, operands)
    w_codes, w_scale = operands["int8 row"]
    x_codes, x_scale = int8_codes(x)
    reference = (x_codes.double() / x_scale.double()) @ (w_codes.double() / w_scale.double()).T
    row.record("int_mm int8 row", lambda: int8_matmul(x_codes, x_scale, w_codes, w_scale, None, torch.bfloat16),
               reference)
    return row.values


def bench_fp8(row: Row, operands: dict, fast_accumulation: tuple[bool, ...] = (False,)) -> None:
    """_scaled_mm on ready codes, and lowbit's fp8_linear from bf16 (Triton activation quantization included):
    per tensor with a static activation amax, per row with dynamic per-row scales; optionally also with
    cuBLAS's fast (not periodically promoted) FP8 accumulation."""
    x = row.x
    for name, rowwise in (("fp8 tensor", False), ("fp8 row", True)):
        w_codes, w_scale = operands[name]
        x_codes, x_scale = fp8_codes(x, rowwise)
        reference = (x_codes.double() / x_scale.double()) @ (w_codes.double() / w_scale.double()).T
        row.record(f"scaled_mm {name}", lambda xc=x_codes, xs=x_scale, wc=w_codes, ws=w_scale:
                   fp8_matmul(xc, xs, wc, ws, None, torch.bfloat16), reference)
        weight = Fp8Weight.from_codes(w_codes, w_scale)
        amax = None if rowwise else x.float().abs().amax().reshape(1, 1)
        label = "lowbit fp8 row, dynamic act quant" if rowwise else "lowbit fp8 tensor, static act quant"
        for fast in fast_accumulation:
            row.record(label + (", fast accum" if fast else ""), lambda wt=weight, a=amax, f=fast:
                       fp8_linear(x, wt, None, a, torch.bfloat16, fast_accumulation=f), reference)


def bench_explore(generator: torch.Generator) -> list[dict]:
    """On EXPLORE_SHAPE: GEMV and tensor-core launch configurations for the decode rows; dequantize
    configurations (alone, and + cuBLAS) and FP8 with cuBLAS's fast accumulation for the prefill rows."""
    kernels = dispatch.triton_w4()
    k, n = EXPLORE_SHAPE
    operands = shape_operands(k, n, generator)
    weight = operands["weight"]
    results = []
    for m in EXPLORE_DECODE_ROWS + EXPLORE_PREFILL_ROWS:
        x = random_matrix(m, k, generator)
        row = Row(x)
        row.record("bf16 cuBLAS", lambda x=x: F.linear(x, weight), row.x64 @ weight.double().T)
        for name, p in operands["packed"].items():
            arguments = dispatch.triton_arguments(p)
            reference = row.x64 @ operands["dequantized"][name].T
            if m == 1:
                for label, config in gemv_configs().items():
                    row.record(f"{name} gemv {label}", lambda x=x, p=p, a=arguments, c=config:
                               kernels.w4_gemv(x, p.codes, p.scale, config=c, **a), reference)
            if m <= 16:
                for label, config in matmul_configs().items():
                    config = {**config, "SCALE_AFTER_DOT": name != "nvfp4"}
                    row.record(f"{name} mma {label}", lambda x=x, p=p, a=arguments, c=config:
                               kernels.w4_matmul(x, p.codes, p.scale, config=c, **a), reference)
            elif m == 2048 and name != "int4-asym g128":
                for label, config in dequantize_configs().items():
                    row.record(f"{name} dq {label} + cuBLAS", lambda x=x, p=p, a=arguments, c=config:
                               F.linear(x, kernels.w4_dequantize(p.codes, p.scale, dtype=x.dtype, config=c, **a)),
                               reference)
                    row.record(f"{name} dq {label} alone (err: vs formats)", lambda p=p, a=arguments, c=config:
                               kernels.w4_dequantize(p.codes, p.scale, dtype=torch.bfloat16, config=c, **a),
                               operands["dequantized"][name])
        if m > 16:
            bench_fp8(row, operands, fast_accumulation=(False, True))
        if m == 2048:  # power-bound products: repeat the library path and its baseline, alternating
            p = operands["packed"]["int4 g128"]
            reference = row.x64 @ operands["dequantized"]["int4 g128"].T
            for repeat in range(1, 4):
                row.record(f"bf16 cuBLAS, repeat {repeat}", lambda x=x: F.linear(x, weight),
                           row.x64 @ weight.double().T)
                row.record(f"lowbit int4 g128, repeat {repeat}", lambda x=x, p=p: weight_only_linear(x, p, None),
                           reference)
        results.append({"K": k, "N": n, "M": m, **row.values})
        print_row(results[-1])
    return results


def print_row(row: dict) -> None:
    base = row["bf16 cuBLAS"]["ms"]
    summary = "  ".join(f"{name.replace('lowbit ', '')}={base / v['ms']:.2f}x" for name, v in row.items()
                        if isinstance(v, dict) and name != "bf16 cuBLAS")
    host = "  ".join(f"{name}={v['host_us']:.0f}" for name, v in row.items() if isinstance(v, dict) and "host_us" in v)
    print(f"K={row['K']} N={row['N']} M={row['M']} bf16={base * 1e3:.1f}us  {summary}", flush=True)
    if host:
        print(f"  host us/call: {host}", flush=True)


def bench_table(shapes: list[tuple[int, int]], rows: list[int], generator: torch.Generator) -> list[dict]:
    results = []
    for k, n in shapes:
        operands = shape_operands(k, n, generator)
        for m in rows:
            results.append({"K": k, "N": n, "M": m, **bench_row(random_matrix(m, k, generator), operands)})
            print_row(results[-1])
        del operands
        torch.cuda.empty_cache()
    return results


def environment(command: str) -> dict:
    import triton

    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        driver = "unknown"
    return {"device": torch.cuda.get_device_name(), "driver": driver, "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "command": command}


def markdown(results: list[dict], env: dict, transpose: bool = False) -> str:
    columns = []
    for row in results:
        columns += [c for c in row if c not in columns and c not in ("K", "N", "M")]
    lines = ["# lowbit kernel benchmark", ""]
    lines += [f"- {key}: {value}" for key, value in env.items()]
    lines += ["- time: GPU time in us, median of triton.testing.do_bench (warmup 25 ms, rep 100 ms, L2 flushed before",
              "  every run) replaying a CUDA graph of the call: host launch overhead excluded (see the notes)",
              "- speedup: bf16 cuBLAS time / kernel time, same run; err: ||y - y64|| / ||y64|| against a float64",
              "  product of the same operands (dequantized weight; activation codes for W8A8)",
              "- lowbit int4 / int4-asym / nvfp4: lowbit.kernels.weight_only_linear as the library calls it (Triton",
              "  CUDA-core GEMV for 1 row, fused Triton tensor-core kernel for 2..127 rows, Triton dequantize + cuBLAS",
              "  from 128); 'fused' / 'dq+cuBLAS': the path dispatch does not take at that M",
              "- lowbit fp8: lowbit.kernels.fp8_linear from bf16 activations (Triton quantization + _scaled_mm)", ""]

    def cell(row, column):
        value = row.get(column)
        if value is None:
            return "-"
        ratio = "" if column == "bf16 cuBLAS" else f" ({row['bf16 cuBLAS']['ms'] / value['ms']:.2f}x)"
        return f"{value['ms'] * 1e3:.1f}{ratio}, err {value['err']:.1e}"

    if transpose:  # one column per M: many configurations read better as rows
        lines += ["| kernel | " + " | ".join(f"M={r['M']}" for r in results) + " |",
                  "|---|" + "---|" * len(results)]
        lines += [f"| {c} | " + " | ".join(cell(r, c) for r in results) + " |" for c in columns]
    else:
        lines += ["| K x N | M | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
        lines += [f"| {r['K']}x{r['N']} | {r['M']} | " + " | ".join(cell(r, c) for c in columns) + " |"
                  for r in results]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/kernels_h100.md"))
    parser.add_argument("--rows", type=int, nargs="*", default=ROWS)
    parser.add_argument("--shapes", type=int, nargs="*", default=None, help="indices into SHAPES")
    parser.add_argument("--explore", action="store_true", help="launch configurations on one shape")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/kernel_speed.py needs a CUDA GPU")
    generator = torch.Generator(device="cuda").manual_seed(0)
    env = environment("python " + " ".join(sys.argv))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.explore:
        results = bench_explore(generator)
    else:
        shapes = SHAPES if args.shapes is None else [SHAPES[i] for i in args.shapes]
        results = bench_table(shapes, args.rows, generator)
    text = markdown(results, env, transpose=args.explore)
    print(text)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"environment": env, "results": results}, indent=1))


if __name__ == "__main__":
    main()
