"""CPU forward time of a CompressedLinear against the fake-quantized Linear it came from.

    python bench/cpu_linear.py --out bench/results      # writes bench/results/memory_cpu_linear_<date>.md

One Linear of ``--shape`` (default 4096 x 4096, bf16, no bias, fresh normal weights with 0.1% x20
outliers, fixed seed) is quantized with each preset (activation quantizers calibrated on two random
batches), then timed as fake quant (``QuantLinear``: the weight quantizer runs on every call) and after
``compress`` (packed storage; ``CompressedLinear``'s CPU path). Times are the median of ``--repeats``
calls under ``torch.inference_mode`` after two warm-up calls, on ``--threads`` intra-op threads.
``compressed / fake`` below 1 means the packed layer is faster. Outputs are checked to agree to 1%
(relative Frobenius norm) so the two paths compute the same layer.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).parent))

import lowbit  # noqa: E402
from lowbit.compress import compress  # noqa: E402
from lowbit.eval import format_table  # noqa: E402

PRESETS = ["INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "W4A16_NVFP4_CFG", "FP8_DEFAULT_CFG", "INT8_DEFAULT_CFG"]
ROWS = [1, 16, 256]
AGREEMENT = 1e-2


def layer(shape: tuple[int, int], generator: torch.Generator) -> nn.Module:
    out_features, in_features = shape
    weight = torch.randn(out_features, in_features, generator=generator) * 0.02
    outliers = torch.rand(out_features, in_features, generator=generator) < 1e-3
    module = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        module.weight.copy_(torch.where(outliers, weight * 20, weight))
    return nn.Sequential(module).to(torch.bfloat16)


def median_seconds(function, x: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        for _ in range(2):
            function(x)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            function(x)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(preset: str, shape: tuple[int, int], repeats: int, generator: torch.Generator) -> list[dict]:
    batches = [torch.randn(8, shape[1], generator=generator).to(torch.bfloat16) for _ in range(2)]
    fake = lowbit.quantize(layer(shape, generator), copy.deepcopy(getattr(lowbit, preset)),
                           lambda model: [model(batch) for batch in batches])
    packed = compress(copy.deepcopy(fake))
    rows = []
    for m in ROWS:
        x = torch.randn(m, shape[1], generator=generator).to(torch.bfloat16)
        with torch.inference_mode():
            expected, out = fake(x).double(), packed(x).double()
        error = ((out - expected).norm() / expected.norm()).item()
        if error > AGREEMENT:
            raise AssertionError(f"{preset} M={m}: compressed and fake-quant outputs differ by {error:.2e}")
        fake_ms = median_seconds(fake, x, repeats) * 1e3
        packed_ms = median_seconds(packed, x, repeats) * 1e3
        rows.append({"preset": preset, "M": m, "fake ms": round(fake_ms, 2), "compressed ms": round(packed_ms, 2),
                     "compressed / fake": round(packed_ms / fake_ms, 2), "rel. diff": f"{error:.1e}"})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=2, default=[4096, 4096], metavar=("OUT", "IN"))
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    shape = tuple(args.shape)
    rows = [row for preset in args.presets.split(",") for row in measure(preset, shape, args.repeats, generator)]
    text = "\n".join([
        "# CompressedLinear vs fake quant, CPU forward", "",
        f"Command: `python bench/cpu_linear.py {' '.join(sys.argv[1:])}`  ",
        f"Layer: {shape[1]} -> {shape[0]}, bf16, no bias; {args.threads} threads; median of {args.repeats}  ",
        f"CPU: {platform.processor() or platform.machine()}; torch {torch.__version__}  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
        "```", format_table(rows), "```", "",
    ])
    from accuracy import write_report  # bench/ is not a package

    write_report(text, args.out, "memory_cpu_linear")


if __name__ == "__main__":
    main()
