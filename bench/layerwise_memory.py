"""Peak host (and GPU) memory and wall time of ``lowbit.quantize_layerwise`` on a random-weight Llama larger than
the memory it may use.

    python bench/layerwise_memory.py [--hidden 1024 --intermediate 2816 --layers 12 --vocab 90000]
        [--budget-ratio 1.5] [--preset FP8_DEFAULT_CFG ...] [--samples 16 --seq-len 128 --batch-size 4]
        [--device cpu | cuda --gpu-ratio 2.0] [--workdir DIR] [--out bench/results]

Setup (untimed, in a subprocess of its own): a ``LlamaForCausalLM`` of that shape with seeded random weights
(normal, std 0.02; norms 1) saved as bf16 safetensors shards of at most 200 MB. Its bf16 weight bytes ``W``.

Each preset then runs in a fresh subprocess: ``quantize_layerwise(checkpoint, preset, batches, out,
device, host_memory_budget=W / budget-ratio)`` on ``samples`` random token windows. The subprocess reports the
resident size after importing torch, transformers and lowbit (the floor), its peak resident set size over the
run (Linux ``VmHWM``, reset to the floor with ``/proc/self/clear_refs`` after the imports), the wall time, the
most activation bytes on disk at once, and the output's size. On CUDA the process may use
``W / gpu-ratio`` bytes of the GPU (``torch.cuda.set_per_process_memory_fraction``); its peak allocated GPU
memory is reported too. The table goes to stdout and to ``out/layerwise_memory_[cuda_]<date>.md``.
``--preset INT4_GPTQ``: INT4 blockwise weights with GPTQ (``lowbit ptq --qformat int4_gptq``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

MEGABYTE = 1e6
PRESET_ALGORITHMS = {"INT4_GPTQ": ("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "gptq")}  # lowbit ptq --qformat int4_gptq


def preset_config(name: str) -> dict:
    """A preset by name, or ``INT4_GPTQ``: INT4 blockwise weights with the GPTQ algorithm."""
    import lowbit

    preset, algorithm = PRESET_ALGORITHMS.get(name, (name, None))
    config = lowbit.get_preset(preset)
    if algorithm is not None:
        config["algorithm"] = algorithm
    return config


def make_checkpoint(args: argparse.Namespace, directory: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 64, max_position_embeddings=max(args.seq_len, 128),
                         tie_word_embeddings=False, dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.copy_(torch.ones_like(parameter) if "norm" in name else torch.randn_like(parameter) * 0.02)
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(directory, max_shard_size="200MB")


def child(args: argparse.Namespace) -> None:
    """One quantize_layerwise run in this process; prints a JSON line with the measurements."""
    import torch
    import transformers  # noqa: F401  (the floor: what every run imports)

    import lowbit
    from lowbit.ptq.memory import status_bytes

    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
    floor = status_bytes("VmRSS")
    if floor is None:
        raise RuntimeError("/proc/self/status has no VmRSS: this bench needs Linux")
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.samples, args.seq_len), generator=generator)
    batches = [{"input_ids": batch} for batch in ids.split(args.batch_size)]
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())  # the memory fraction needs an index
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(args.gpu_bytes / total, device)
        torch.cuda.reset_peak_memory_stats(device)
    preset = args.preset[-1]
    out = Path(args.workdir) / f"out-{preset}"
    start = time.perf_counter()
    result = lowbit.quantize_layerwise(args.checkpoint, preset_config(preset), batches, out, device=device,
                                       host_memory_budget=args.budget, offload_dir=Path(args.workdir) / "spill",
                                       overwrite=True)
    seconds = time.perf_counter() - start
    record = {"floor": floor, "peak": status_bytes("VmHWM"), "seconds": seconds,
              "on_disk": result.activation_bytes_on_disk, "reserved": result.reserved_bytes,
              "output": sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")}
    if device.type == "cuda":
        record["gpu_peak"] = torch.cuda.max_memory_allocated(device)
    print("MEMORY " + json.dumps(record))
    shutil.rmtree(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=90000)
    parser.add_argument("--budget-ratio", type=float, default=1.5)
    parser.add_argument("--gpu-ratio", type=float, default=2.0)
    parser.add_argument("--preset", action="append")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", default="/tmp/lowbit-layerwise-bench")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--make", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--gpu-bytes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make:
        make_checkpoint(args, Path(args.checkpoint))
        return
    if args.child:
        child(args)
        return
    presets = args.preset or ["FP8_DEFAULT_CFG"]
    workdir = Path(args.workdir)
    checkpoint = workdir / f"llama-{args.hidden}-{args.intermediate}-{args.layers}-{args.vocab}"
    shape = ["--hidden", str(args.hidden), "--intermediate", str(args.intermediate), "--layers", str(args.layers),
             "--vocab", str(args.vocab), "--seq-len", str(args.seq_len)]
    if not (checkpoint / "config.json").is_file():
        subprocess.run([sys.executable, __file__, "--make", "--checkpoint", str(checkpoint), *shape], check=True)
    weight_bytes = _weight_bytes(checkpoint)
    budget = int(weight_bytes / args.budget_ratio)
    gpu_bytes = int(weight_bytes / args.gpu_ratio)
    rows = []
    for preset in presets:
        command = [sys.executable, __file__, "--child", "--checkpoint", str(checkpoint), "--preset", preset,
                   "--budget", str(budget), "--gpu-bytes", str(gpu_bytes), "--device", args.device,
                   "--samples", str(args.samples), "--batch-size", str(args.batch_size), "--workdir", args.workdir,
                   *shape]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            sys.stderr.write(result.stderr[-3000:])
            raise SystemExit(f"{preset}: the run failed")
        line = next(line for line in result.stdout.splitlines() if line.startswith("MEMORY "))
        rows.append((preset, json.loads(line.removeprefix("MEMORY "))))
        print(preset, rows[-1][1], flush=True)
    _report(args, presets, checkpoint, weight_bytes, budget, gpu_bytes, rows)


def _weight_bytes(checkpoint: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in checkpoint.glob("*.safetensors"):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                shape = handle.get_slice(name).get_shape()
                count = 1
                for size in shape:
                    count *= size
                total += 2 * count  # bf16
    return total


def _report(args, presets, checkpoint, weight_bytes, budget, gpu_bytes, rows) -> None:
    import torch
    import transformers

    cuda = args.device.startswith("cuda")
    device = torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()})"
    lines = [
        f"# quantize_layerwise memory, {args.device}",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; device: {device}; "
        f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}",
        f"- command: `python bench/layerwise_memory.py {' '.join(sys.argv[1:])}`",
        f"- model: random Llama hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
        f"vocab {args.vocab}: bf16 weights W = {weight_bytes / MEGABYTE:.1f} MB in {checkpoint}",
        f"- host_memory_budget = W / {args.budget_ratio} = {budget / MEGABYTE:.1f} MB"
        + (f"; GPU memory the process may use = W / {args.gpu_ratio} = {gpu_bytes / MEGABYTE:.1f} MB" if cuda else ""),
        f"- calibration: {args.samples} random windows of {args.seq_len} tokens, batches of {args.batch_size}",
        "- floor: resident after importing torch, transformers, lowbit; peak: VmHWM over the run (reset after imports)",
        "- reserved: what quantize_layerwise kept from the budget for the modules outside the blocks and a block at "
        "its peak (lowbit.scale.memory); the rest held activations, disk beyond it",
        "",
        "| preset | wall s | host peak MB | peak - floor MB | (peak - floor) / budget | reserved MB | "
        "activations on disk MB |" + (" GPU peak MB | GPU peak / W |" if cuda else "") + " output MB |",
        "|---|---|---|---|---|---|---|" + ("---|---|" if cuda else "") + "---|",
    ]
    for preset, r in rows:
        above = r["peak"] - r["floor"]
        gpu = f" {r['gpu_peak'] / MEGABYTE:.1f} | {r['gpu_peak'] / weight_bytes:.2f} |" if cuda else ""
        lines.append(f"| {preset} | {r['seconds']:.1f} | {r['peak'] / MEGABYTE:.1f} | {above / MEGABYTE:.1f} | "
                     f"{above / budget:.2f} | {r['reserved'] / MEGABYTE:.1f} | {r['on_disk'] / MEGABYTE:.1f} |{gpu} "
                     f"{r['output'] / MEGABYTE:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.date.today().isoformat()
    (out / f"layerwise_memory_{'cuda_' if cuda else ''}{stamp}.md").write_text(text)


if __name__ == "__main__":
    main()
