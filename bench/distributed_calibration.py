"""Data-parallel calibration with ``lowbit.distributed``: wall time and peak memory per rank, and the quantizers
against a one-process run on the union of the data.

    torchrun --nproc-per-node N bench/distributed_calibration.py [--backend nccl|gloo] [--device cuda|cpu]
        [--model default|DIR] [--preset INT4_AWQ_CFG] [--algorithm '{"method": "gptq"}'] [--samples 64]
        [--seq-len 256] [--batch-size 4] --save DIR
    python bench/distributed_calibration.py --compare DIR_ONE DIR_N [--out bench/results]

Each rank loads the model (``lowbit.hf.load_causal_lm``, bf16 on ``cuda:LOCAL_RANK``, float32 on CPU), takes
every N-th of the seeded calibration windows of the bundled calibration text (``lowbit.distributed.shard``) and
runs ``lowbit.quantize`` inside ``calibrating_across()``. Rank 0 saves the quantized model (``lowbit.save``: the
weights, which GPTQ and AWQ change, and every quantizer's amax) to ``--save`` with a ``timing.json`` of each
rank's calibration wall time and peak memory (GPU: ``torch.cuda.max_memory_allocated``; host: VmHWM). Run it
with N = 1 and N > 1 on the same machine, then ``--compare`` prints (and appends to
``out/distributed_calibration.md``) the largest relative difference of every amax, pre_quant_scale and weight,
and the time ratio.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path


def _host_peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def calibrate(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    import lowbit
    from lowbit.data import calibration_batches, make_forward_loop
    from lowbit.hf import load_causal_lm

    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if args.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model, tokenizer = load_causal_lm(args.model, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                                      device=str(device))
    batches = calibration_batches(tokenizer, lowbit.assets.bundled_text("calibration"), num_samples=args.samples,
                                  seq_len=args.seq_len, batch_size=args.batch_size)
    config = lowbit.get_preset(args.preset)
    if args.algorithm:
        config["algorithm"] = json.loads(args.algorithm)
    dist.barrier()
    start = time.perf_counter()
    with lowbit.distributed.calibrating_across():
        lowbit.quantize(model, config, make_forward_loop(lowbit.distributed.shard(batches), progress=rank == 0))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    record = {"rank": rank, "seconds": seconds, "host_peak": _host_peak(),
              "gpu_peak": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}
    records = [None] * world
    dist.all_gather_object(records, record)
    if rank == 0:
        lowbit.save(model.cpu(), args.save, overwrite=True)
        setup = {"world": world, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
                 "backend": args.backend, "preset": args.preset, "algorithm": args.algorithm,
                 "samples": args.samples, "seq_len": args.seq_len, "model": args.model,
                 "torch": torch.__version__, "command": " ".join(sys.argv)}
        (Path(args.save) / "timing.json").write_text(json.dumps({"setup": setup, "ranks": records}, indent=1))
    dist.destroy_process_group()


def compare(args: argparse.Namespace) -> None:
    from safetensors.torch import load_file

    one, many = (Path(folder) for folder in args.compare)
    reference, other = load_file(one / "model.safetensors"), load_file(many / "model.safetensors")
    worst: dict[str, tuple[float, str]] = {}
    for key, value in reference.items():
        kind = key.rsplit(".", 1)[-1] if key.endswith(("amax", "pre_quant_scale")) else "weight"
        if not value.is_floating_point():
            continue
        difference = float((other[key].double() - value.double()).abs().max()
                           / value.double().abs().max().clamp_min(1e-30))
        if difference >= worst.get(kind, (-1.0, ""))[0]:
            worst[kind] = (difference, key)
    timing = [json.loads((folder / "timing.json").read_text()) for folder in (one, many)]
    slowest = [max(r["seconds"] for r in t["ranks"]) for t in timing]
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [f"## {now:%Y-%m-%d %H:%M} UTC, python {platform.python_version()}",
             "", f"- 1 rank: `{timing[0]['setup']['command']}`", f"- {timing[1]['setup']['world']} ranks: "
             f"`{timing[1]['setup']['command']}`", f"- setup: {json.dumps(timing[1]['setup'])}", "",
             "| ranks | slowest rank s | peak GPU MB per rank | peak host MB per rank |", "|---|---|---|---|"]
    for t, seconds in zip(timing, slowest, strict=True):
        gpu = ", ".join("-" if r["gpu_peak"] is None else f"{r['gpu_peak'] / 1e6:.0f}" for r in t["ranks"])
        host = ", ".join(f"{r['host_peak'] / 1e6:.0f}" for r in t["ranks"])
        lines.append(f"| {t['setup']['world']} | {seconds:.2f} | {gpu} | {host} |")
    lines += ["", f"time ratio (N ranks / 1): {slowest[1] / slowest[0]:.2f}", "",
              "| tensors | largest relative difference (of the tensor's max) | where |", "|---|---|---|"]
    lines += [f"| {kind} | {difference:.3g} | {key} |" for kind, (difference, key) in sorted(worst.items())]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "distributed_calibration.md", "a") as handle:
        handle.write(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="nccl", choices=["nccl", "gloo"])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--model", default="default")
    parser.add_argument("--preset", default="INT4_AWQ_CFG")
    parser.add_argument("--algorithm", default=None, help="JSON algorithm replacing the preset's")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--save")
    parser.add_argument("--compare", nargs=2)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    if args.compare:
        compare(args)
    elif args.save:
        calibrate(args)
    else:
        parser.error("pass --save DIR (under torchrun) or --compare DIR_ONE DIR_N")


if __name__ == "__main__":
    main()
