"""CPU decode kernels in the regime a decoder runs them: one activation row against a stack of layer weights too
large for the caches, so every code is read from memory once per token.

    python bench/cpu_decode.py [--hidden 2048 --intermediate 5632 --layers 4] [--threads N] [--out FILE]

Per kernel, the seconds of one pass over every Linear weight of ``--layers`` Llama decoder layers (q, k, v, o of
hidden x hidden; gate, up of intermediate x hidden; down of hidden x intermediate), each call on its own weight, in
a fixed order, best of ``--repeats`` passes after one untimed pass; the rate is the weight bytes read per second.
Side by side in one process: bf16 ``F.linear``, torch's ``_weight_int8pack_mm``, torch's INT4
``_weight_int4pack_mm_for_cpu`` (g128), and lowbit's C kernels (``kernels.cpu_fp``: INT8, FP8, NVFP4). A float32
sum over a tensor as large as the INT8 codes gives the memory's read rate for scale.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lowbit.compress.packed import WeightFormat, quantize_weight
from lowbit.kernels import cpu, cpu_fp

SEED = 0


def layer_shapes(hidden: int, intermediate: int, layers: int) -> list[tuple[int, int]]:
    """(N, K) of every decoder Linear, in call order."""
    return ([(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + [(hidden, intermediate)]) * layers


def best_pass_seconds(calls: list, repeats: int) -> float:
    for call in calls:
        call()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for call in calls:
            call()
        best = min(best, time.perf_counter() - started)
    return best


def kernels(shapes: list[tuple[int, int]]) -> dict[str, tuple[list, int]]:
    """name -> (one call per layer, bytes of weight operands read per pass)."""
    generator = torch.Generator().manual_seed(SEED)
    dense = [torch.randn(shape, generator=generator) * 0.02 for shape in shapes]
    rows = {k: torch.randn(1, k, generator=generator).to(torch.bfloat16) for k in {k for _, k in shapes}}

    def each(function, operands: list[tuple]) -> tuple[list, int]:
        """Calls ``function(row of K, *arguments)`` for operands ``(weight bytes tensor, K, *arguments)``."""
        calls = [lambda o=o: function(rows[o[1]], *o[2:]) for o in operands]
        return calls, sum(o[0].numel() * o[0].element_size() for o in operands)

    bf16 = [w.to(torch.bfloat16) for w in dense]
    result = {"bf16 F.linear": each(F.linear, [(w, k, w) for w, (_, k) in zip(bf16, shapes, strict=True)])}
    int8 = [quantize_weight(w, WeightFormat("int", 8, per_channel=True)) for w in dense]
    scales = [cpu.int8_scales(p, torch.bfloat16) for p in int8]
    result["torch int8pack"] = each(cpu.int8_linear, [(p.codes, p.shape[1], p.codes, scale)
                                                      for p, scale in zip(int8, scales, strict=True)])
    int4 = [quantize_weight(w, WeightFormat("int", 4, block_size=128)) for w in dense]
    result["torch int4pack g128"] = each(cpu.int4_linear, [(o[0], p.shape[1], *o) for p in int4
                                                           for o in [cpu.int4_operands(p, torch.bfloat16)]])
    if cpu_fp.available():
        result["lowbit C int8"] = each(cpu_fp.int8_rows,
                                       [(p.codes, p.shape[1], *cpu_fp.int8_operands(p)) for p in int8])
        for name, fmt in (("lowbit C fp8", WeightFormat("float", (4, 3), per_channel=True)),
                          ("lowbit C nvfp4", WeightFormat("nvfp4", (2, 1), block_size=16))):
            packed = [quantize_weight(w, fmt) for w in dense]
            function = cpu_fp.weight_only_kernel(packed[0])[0]
            result[name] = each(function, [(p.codes, p.shape[1], *cpu_fp.weight_only_kernel(p)[1]) for p in packed])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = layer_shapes(args.hidden, args.intermediate, args.layers)
    lines = [f"# CPU decode kernels, one row, {args.layers} layers of {args.hidden}/{args.intermediate}", "",
             f"Command: `python bench/cpu_decode.py --hidden {args.hidden} --intermediate {args.intermediate} "
             f"--layers {args.layers} --threads {args.threads}`  ",
             f"Machine: {platform.machine()}, {args.threads} threads; torch {torch.__version__}; "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", "",
             "| kernel | ms per pass | weight GB/s | x bf16 |", "|---|---|---|---|"]
    measured = {name: (best_pass_seconds(calls, args.repeats), size) for name, (calls, size) in kernels(shapes).items()}
    bf16_seconds = measured["bf16 F.linear"][0]
    for name, (seconds, size) in measured.items():
        lines.append(f"| {name} | {seconds * 1e3:.2f} | {size / seconds / 1e9:.1f} | {bf16_seconds / seconds:.2f} |")
    big = torch.randn(sum(n * k for n, k in shapes) // 4)
    lines += ["", f"Memory read rate (float32 sum of {big.numel() * 4 / 1e6:.0f} MB): "
              f"{big.numel() * 4 / best_pass_seconds([big.sum], args.repeats) / 1e9:.1f} GB/s"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
