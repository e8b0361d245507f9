"""Peak memory of loading a Llama packed by lowbit while it loads against a dense bf16 load.

    python bench/memory.py --device cpu                  # writes bench/results/memory_cpu_<date>.md
    python bench/memory.py --device cuda                 # writes bench/results/memory_cuda_<date>.md
    python bench/memory.py --save DIR [--hidden ...]     # only write the random checkpoint
    python bench/memory.py --probe DIR [--preset P] [--device D]   # one load, one JSON line

A Llama of the given shape (default: TinyLlama's, 1.1B parameters) is built on the meta device, given
fresh random weights (normal x 0.02, fixed seed, no network) and saved as bf16 safetensors in a temp dir.
Each row then loads it in a fresh process (``--probe``): dense (``bf16``) or with
``from_pretrained(..., quantization_config=LowbitConfig(preset))`` (transformers' quantizer integration running
``init_quantized_weights``' loader), then reads every parameter and buffer once, as a first forward would.

- ``peak CPU``: the highest increase of the process' anonymous memory (``RssAnon``, sampled every
  millisecond, over its value just before ``from_pretrained``) plus the model's tensors that still live in
  safetensors' file mapping after loading (a dense load's weights, the embeddings and lm_head of a packed
  one), read once as a first forward would. The checkpoint pages a packed load reads only to pack are
  clean page cache, which the kernel reclaims without swapping: ``VmRSS`` (listed as ``peak RSS``)
  counts them while the mapping lives, the peak does not.
- ``peak GPU`` (``--device cuda``, ``device_map="cuda"``, which needs ``accelerate``):
  ``torch.cuda.max_memory_allocated()``, and the caching allocator's ``max_memory_reserved()``.
- ``model``: the loaded model's bytes (``lowbit.eval.model_size``); ``model / bf16`` is the floor any
  load of that format can reach (embeddings, lm_head and norms stay dense in the presets).

``anon / bf16 model`` is the anonymous peak over the dense model's bytes (the checkpoint size); ``peak CPU /
bf16`` is stricter: it adds the dense tensors kept in the mapping and divides by the dense load's peak.
Ratios divide by the bf16 row of the same run. The issue's target: a 4-bit load peaks at <= 0.4x of
the bf16 load.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

PRESETS = ["INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "W4A16_NVFP4_CFG", "FP8_DEFAULT_CFG", "INT8_DEFAULT_CFG"]
FOUR_BIT = {"INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "W4A16_NVFP4_CFG"}
TARGET_RATIO = 0.4
MB = 1e6


def status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``RssAnon``, ...) in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def save(directory: str, hidden: int, layers: int, intermediate: int, vocab: int) -> int:
    """Write a random bf16 Llama of this shape to ``directory``; returns its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 512))
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    model.to(torch.bfloat16).save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


class PeakSampler:
    """Tracks the highest increase of ``VmRSS`` and ``RssAnon`` over their values at construction,
    sampling every millisecond."""

    FIELDS = ("VmRSS", "RssAnon")

    def __init__(self):
        self.start = {field: status_bytes(field) for field in self.FIELDS}
        self.peak = dict(self.start)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.is_set():
            self._update()
            time.sleep(0.001)

    def _update(self) -> None:
        for field in self.FIELDS:
            self.peak[field] = max(self.peak[field], status_bytes(field))

    def stop(self) -> dict[str, int]:
        """Stop sampling; the peak increase of each field in bytes."""
        self._done.set()
        self._thread.join()
        self._update()
        return {field: self.peak[field] - self.start[field] for field in self.FIELDS}


PAGE = 4096


def mapped_file_bytes(model: torch.nn.Module) -> int:
    """Bytes of ``model``'s CPU tensors (each storage once) that live in a mapping of a ``.safetensors`` file."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if fields[-1].endswith(".safetensors"):
                start, end = (int(address, 16) for address in fields[0].split("-"))
                ranges.append((start, end))
    storages = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        if tensor.device.type == "cpu" and any(start <= storage.data_ptr() < end for start, end in ranges):
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def touch(model: torch.nn.Module) -> None:
    """Read one byte of every page of every parameter and buffer (a file mapping's pages become resident)."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.numel():
                tensor.detach().reshape(-1).view(torch.uint8)[::PAGE].sum()


def probe(directory: str, preset: str | None, device: str) -> dict:
    """Load ``directory`` once (dense, or packed by ``preset``) and measure; see the module docstring."""
    from transformers import AutoModelForCausalLM

    import lowbit
    from lowbit.compress import LowbitConfig
    from lowbit.eval import model_size

    options = {"quantization_config": LowbitConfig(copy.deepcopy(getattr(lowbit, preset)))} if preset else {}
    options |= {"device_map": device} if device == "cuda" else {}
    sampler = PeakSampler()
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, **options)
    touch(model)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peaks = sampler.stop()
    result = {"peak_rss": peaks["VmRSS"], "peak_anon": peaks["RssAnon"], "mapped": mapped_file_bytes(model),
              "model": model_size(model), "seconds": seconds}
    if device == "cuda":
        result["peak_gpu"] = torch.cuda.max_memory_allocated()
        result["reserved_gpu"] = torch.cuda.max_memory_reserved()
    return result


def run_probe(directory: str, preset: str | None, device: str) -> dict:
    """``probe`` in a fresh Python process (this script with --probe), so peaks do not mix."""
    command = [sys.executable, __file__, "--probe", directory, "--device", device]
    command += ["--preset", preset] if preset else []
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run(command, capture_output=True, text=True, env=environment)
    if out.returncode:
        raise RuntimeError(f"probe {preset or 'bf16'} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_cpu(result: dict) -> int:
    return result["peak_anon"] + result["mapped"]


def table_rows(results: dict[str, dict], device: str) -> list[dict]:
    dense = results["bf16"]
    rows = []
    for name, result in results.items():
        row = {"load": name, "model MB": round(result["model"] / MB, 1),
               "model / bf16": round(result["model"] / dense["model"], 3)}
        if device == "cuda":
            row["peak GPU MB"] = round(result["peak_gpu"] / MB, 1)
            row["peak GPU / bf16"] = round(result["peak_gpu"] / dense["peak_gpu"], 3)
            row["reserved GPU MB"] = round(result["reserved_gpu"] / MB, 1)
        else:
            row["peak anon MB"] = round(result["peak_anon"] / MB, 1)
            row["anon / bf16 model"] = round(result["peak_anon"] / dense["model"], 3)
            row["mapped MB"] = round(result["mapped"] / MB, 1)
            row["peak CPU MB"] = round(peak_cpu(result) / MB, 1)
            row["peak CPU / bf16"] = round(peak_cpu(result) / peak_cpu(dense), 3)
        row["peak RSS MB"] = round(result["peak_rss"] / MB, 1)
        row["s"] = round(result["seconds"], 1)
        rows.append(row)
    return rows


def verdicts(results: dict[str, dict], device: str) -> list[str]:
    dense = results["bf16"]
    lines = []
    for name in FOUR_BIT & results.keys():
        if device == "cuda":
            label, ratio = "GPU allocated", results[name]["peak_gpu"] / dense["peak_gpu"]
        else:
            label, ratio = "CPU", peak_cpu(results[name]) / peak_cpu(dense)
        verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
        lines.append(f"- {name} peak {label}: {ratio:.3f}x of bf16 (target <= {TARGET_RATIO}): {verdict}")
    return sorted(lines)


def report(results: dict[str, dict], args: argparse.Namespace, parameters: int) -> str:
    from lowbit.eval import format_table

    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    shape = f"hidden {args.hidden}, layers {args.layers}, intermediate {args.intermediate}, vocab {args.vocab}"
    return "\n".join([
        f"# Packed loading (LowbitConfig) peak memory ({args.device})", "",
        f"Command: `python bench/memory.py {' '.join(sys.argv[1:])}`  ",
        f"Model: random Llama, {parameters / 1e9:.2f}B parameters ({shape}), bf16 safetensors  ",
        f"Device: {device}; torch {torch.__version__}, Python {platform.python_version()}  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
        "Each row is a fresh process; peaks are increases over the process before from_pretrained, "
        "ratios against the bf16 row (see bench/memory.py's docstring).", "",
        "```", format_table(table_rows(results, args.device)), "```", "",
        *verdicts(results, args.device), "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--save", metavar="DIR", help="only write the random checkpoint to DIR")
    parser.add_argument("--probe", metavar="DIR", help="only load DIR once and print a JSON line")
    parser.add_argument("--preset", help="with --probe: the lowbit preset to load with (default: dense bf16)")
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma-separated lowbit presets to compare")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    if args.device == "cuda" and importlib.util.find_spec("accelerate") is None:
        parser.error("--device cuda loads with device_map='cuda', which transformers runs through accelerate: "
                     "pip install accelerate")
    if args.probe:
        print(json.dumps(probe(args.probe, args.preset, args.device)))
        return
    if args.save:
        print(save(args.save, args.hidden, args.layers, args.intermediate, args.vocab))
        return
    with tempfile.TemporaryDirectory() as directory:
        parameters = save(directory, args.hidden, args.layers, args.intermediate, args.vocab)
        results = {}
        for preset in [None, *filter(None, args.presets.split(","))]:
            results[preset or "bf16"] = run_probe(directory, preset, args.device)
            print(preset or "bf16", results[preset or "bf16"], flush=True)
    from accuracy import write_report  # bench/ is not a package

    write_report(report(results, args, parameters), args.out, f"memory_{args.device}")


if __name__ == "__main__":
    main()
