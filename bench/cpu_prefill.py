"""CPU prefill: does dequantize-then-``F.linear`` beat torch's weight-only kernels at many rows?

    python bench/cpu_prefill.py --threads 1 --out bench/results     # writes cpu_prefill_<date>.md

For each weight (OUT x IN, bf16, fresh normal weights, fixed seed) and format (INT4 g128, INT8 per channel) and
each row count M: the median wall time (``--repeats`` calls after one warm-up, side by side in one process) of
the bf16 product ``F.linear(x, W)``, of the CPU kernel ``compress()`` prepares (``kernels.cpu``), of lowbit's
exact dequantization alone (``PackedWeight.dequantize(bf16)``) and of dequantization followed by the bf16
product. Ratios are bf16 time over the path's: a dequantize-first rule above some M pays only where the last
column beats the kernel's.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).parent))

from lowbit.compress.packed import WeightFormat, quantize_weight  # noqa: E402
from lowbit.eval import format_table  # noqa: E402
from lowbit.kernels import cpu  # noqa: E402

FORMATS = {"int4 g128": WeightFormat("int", 4, block_size=128), "int8": WeightFormat("int", 8)}
SEED = 0


def median_ms(repeats: int, function, *arguments) -> float:
    function(*arguments)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function(*arguments)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def kernel(packed, name: str) -> tuple:
    """(the prepared CPU kernel of ``packed``, its operands after x)."""
    if name.startswith("int4"):
        return cpu.int4_linear, cpu.int4_operands(packed, torch.bfloat16)
    return cpu.int8_linear, (packed.codes, cpu.int8_scales(packed, torch.bfloat16))


def dequantize_linear(x: torch.Tensor, packed) -> torch.Tensor:
    return F.linear(x, packed.dequantize(torch.bfloat16))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=2, default=[5632, 2048], metavar=("OUT", "IN"))
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 64, 128, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(SEED)
    weight = (torch.randn(*args.shape, generator=generator) * 0.05).to(torch.bfloat16)
    rows = []
    for name, fmt in FORMATS.items():
        packed = quantize_weight(weight, fmt)
        function, operands = kernel(packed, name)
        dequantize_ms = median_ms(args.repeats, packed.dequantize, torch.bfloat16)
        for m in args.rows:
            x = torch.randn(m, args.shape[1], generator=generator).to(torch.bfloat16)
            bf16 = median_ms(args.repeats, F.linear, x, weight)
            fused = median_ms(args.repeats, function, x, *operands)
            first = median_ms(args.repeats, dequantize_linear, x, packed)
            rows.append({"format": name, "M": m, "bf16 ms": round(bf16, 1), "kernel ms": round(fused, 1),
                         "kernel x bf16": round(bf16 / fused, 2), "dequantize ms": round(dequantize_ms, 1),
                         "dequantize + linear ms": round(first, 1),
                         "dequantize + linear x bf16": round(bf16 / first, 2)})
            print(rows[-1], flush=True)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    text = "\n".join([
        "# CPU prefill: weight-only kernels against dequantize + F.linear", "",
        f"Command: `python bench/cpu_prefill.py {' '.join(sys.argv[1:])}`  ",
        f"Device: {platform.processor() or platform.machine()}; {args.threads} threads; torch {torch.__version__}  ",
        f"Weight: {args.shape[0]} x {args.shape[1]} bf16; load (uptime, at the end): {load}  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
        "```", format_table(rows), "```", "",
    ])
    from accuracy import write_report  # bench/ is not a package

    write_report(text, args.out, "cpu_prefill")


if __name__ == "__main__":
    main()
