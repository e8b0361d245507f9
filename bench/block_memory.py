"""Host memory of one decoder block at its peak in ``lowbit.quantize_layerwise`` on the CPU, per calibration
algorithm, measured against ``lowbit.scale.memory.block_memory``'s figure (what the runner reserves for it).

    python bench/block_memory.py [--shape 512x1408 --shape 1024x2816] [--preset FP8_DEFAULT_CFG ...]
        [--samples 16 --seq-len 128 --batch-size 4] [--workdir DIR] [--out bench/results]

Setup (untimed, in a subprocess of its own): per ``--shape HIDDENxINTERMEDIATE`` a one-block random Llama (seeded
normal weights, std 0.02; norms 1; vocabulary 256, so the modules outside the block weigh little) saved as bf16
safetensors.

Each (shape, preset) then runs in a fresh subprocess: ``quantize_layerwise`` on ``samples`` random token windows
with a budget far above need (the runner then fixes glibc's mmap threshold, as with any budget). Measured: the
resident-set peak over the run (Linux ``VmHWM``, reset after the imports) less the resident size then, less what
the run holds besides the block: the modules outside it (bf16) and two activation stores (the block's inputs and
its outputs, ``samples seq_len hidden 2`` bytes each). Predicted: ``block_memory``'s terms. The "temporaries"
column is the measured block peak less the weights, the larger of the forward and kept terms and the first
forward's buffers (``lowbit.ptq.estimate.FIRST_FORWARD_KEPT``, 8 MB), in float32 copies of the block's weights:
the figure ``lowbit.scale.memory.TEMPORARIES`` takes (the largest over shapes, rounded up). A one-block run does
not show what earlier blocks leave in the heap; ``RUN_OVERHEAD`` in the prediction does (bench/layerwise_memory.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

from layerwise_memory import make_checkpoint, preset_config  # bench/ is this script's sys.path[0]

MEGABYTE = 1e6
VOCAB = 256


def child(args: argparse.Namespace) -> None:
    """One run in this process; prints a JSON line with the measured and predicted bytes."""
    import time

    import torch

    import lowbit
    from lowbit.config import parse_config
    from lowbit.ptq.memory import status_bytes
    from lowbit.scale.memory import block_memory
    from lowbit.scale.shards import meta_model

    config = preset_config(args.preset)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (args.samples, args.seq_len), generator=generator)
    batches = [{"input_ids": batch} for batch in ids.split(args.batch_size)]
    skeleton = meta_model(args.checkpoint, torch.bfloat16)
    parsed = parse_config(config)
    lowbit.quantize(skeleton, dataclasses.replace(parsed, algorithm=None, algorithm_options={}))  # as the runner
    layer = skeleton.model.layers[0]
    outside = sum(p.numel() * p.element_size() for p in skeleton.parameters()) - sum(
        p.numel() * p.element_size() for p in layer.parameters())
    algorithm = parsed.algorithm
    predicted = block_memory(layer, algorithm, parsed.algorithm_options, ids.numel(), args.batch_size * args.seq_len)
    stores = 2 * ids.numel() * skeleton.config.hidden_size * 2
    del skeleton, layer
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
    floor = status_bytes("VmRSS")
    start = time.perf_counter()
    lowbit.quantize_layerwise(args.checkpoint, config, batches, Path(args.workdir) / f"out-{args.preset}",
                              host_memory_budget=1 << 40, overwrite=True)
    measured = status_bytes("VmHWM") - floor - outside - stores
    numel = predicted.weights // 2
    print("MEMORY " + json.dumps({"algorithm": algorithm, "measured": measured, "seconds": time.perf_counter() - start,
                                  "weights": predicted.weights, "temporaries": predicted.temporaries,
                                  "forward": predicted.forward, "kept": predicted.kept, "fixed": predicted.fixed,
                                  "numel": numel,
                                  "outside": outside, "stores": stores}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", action="append", help="HIDDENxINTERMEDIATE (default 512x1408 and 1024x2816)")
    parser.add_argument("--preset", action="append", help="default: FP8_DEFAULT_CFG INT4_AWQ_CFG INT4_GPTQ "
                                                          "NVFP4_DEFAULT_CFG")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workdir", default="/tmp/lowbit-block-memory")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--make", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shapes = args.shape or ["512x1408", "1024x2816"]
    if args.make:
        hidden, intermediate = map(int, shapes[-1].split("x"))
        shape = argparse.Namespace(vocab=VOCAB, hidden=hidden, intermediate=intermediate, layers=1,
                                   seq_len=args.seq_len)
        make_checkpoint(shape, Path(args.checkpoint))
        return
    if args.child:
        args.preset = args.preset[-1]
        child(args)
        return
    presets = args.preset or ["FP8_DEFAULT_CFG", "INT4_AWQ_CFG", "INT4_GPTQ", "NVFP4_DEFAULT_CFG"]
    rows = []
    for shape in shapes:
        checkpoint = Path(args.workdir) / f"llama-{shape}"
        if not (checkpoint / "config.json").is_file():
            subprocess.run([sys.executable, __file__, "--make", "--shape", shape, "--checkpoint", str(checkpoint)],
                           check=True)
        for preset in presets:
            command = [sys.executable, __file__, "--child", "--checkpoint", str(checkpoint), "--preset", preset,
                       "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--batch-size",
                       str(args.batch_size), "--workdir", args.workdir]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode:
                sys.stderr.write(result.stderr[-3000:])
                raise SystemExit(f"{shape} {preset}: the run failed")
            line = next(line for line in result.stdout.splitlines() if line.startswith("MEMORY "))
            rows.append((shape, preset, json.loads(line.removeprefix("MEMORY "))))
            print(shape, preset, rows[-1][2], flush=True)
    _report(args, rows)


def _report(args, rows) -> None:
    import torch
    import transformers

    from lowbit.ptq.estimate import FIRST_FORWARD_KEPT

    lines = [
        "# quantize_layerwise: one block's host peak on the CPU, measured against lowbit.scale.memory",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; device: CPU "
        f"({platform.processor() or platform.machine()}); torch {torch.__version__}, transformers "
        f"{transformers.__version__}, python {platform.python_version()}",
        f"- command: `python bench/block_memory.py {' '.join(sys.argv[1:])}`",
        f"- model: one random Llama block per shape (hidden x intermediate), bf16, vocabulary {VOCAB}; calibration: "
        f"{args.samples} random windows of {args.seq_len} tokens, batches of {args.batch_size}",
        "- measured block peak: VmHWM - VmRSS after imports - modules outside the block - two activation stores",
        "- W_b: the block's bf16 weights; temporaries: (measured - W_b - max(forward, kept) - 8 MB) in float32 "
        "copies of the block's weights (4 numel)",
        "",
        "| shape | preset | algorithm | W_b MB | forward MB | kept MB | measured block peak MB | predicted MB | "
        "measured / predicted | temporaries (x 4 numel) | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shape, preset, r in rows:
        predicted = r["weights"] + r["temporaries"] + max(r["forward"], r["kept"]) + r["fixed"]
        residual = (r["measured"] - r["weights"] - max(r["forward"], r["kept"]) - FIRST_FORWARD_KEPT) / (4 * r["numel"])
        lines.append(f"| {shape} | {preset} | {r['algorithm']} | {r['weights'] / MEGABYTE:.1f} | "
                     f"{r['forward'] / MEGABYTE:.1f} | {r['kept'] / MEGABYTE:.1f} | {r['measured'] / MEGABYTE:.1f} | "
                     f"{predicted / MEGABYTE:.1f} | {r['measured'] / predicted:.2f} | {residual:.2f} | "
                     f"{r['seconds']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"block_memory_{datetime.date.today().isoformat()}.md").write_text(text)


if __name__ == "__main__":
    main()
