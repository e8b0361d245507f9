"""Peak memory of loading a Llama checkpoint dense (bf16) or through init_quantized_weights.

    python tests/compress/memory_probe.py save DIR --hidden 2048 --layers 22 --intermediate 5632 --vocab 32000
    python tests/compress/memory_probe.py load DIR [--preset INT4_BLOCKWISE_WEIGHT_ONLY_CFG] [--device cuda]
    python tests/compress/memory_probe.py sizes --hidden 2048 --layers 22 --intermediate 5632 --vocab 32000

``load --device cuda`` loads onto the GPU and prints ``torch.cuda.max_memory_allocated()`` in bytes (last
token): the dense model's weights, or the packed ones plus the transients of packing one weight.
``load`` on the CPU prints the peak increase of the process' anonymous resident memory (RssAnon, sampled
every millisecond): a dense bf16 load keeps its weights in safetensors' file mapping (page cache, not
anonymous), so compare CPU figures with the checkpoint size. Used by test_loading_gpu.py and for the 1B
figures.
"""

from __future__ import annotations

import argparse
import copy
import threading
import time

import torch


def anonymous_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no RssAnon")


def save(directory: str, hidden: int, layers: int, intermediate: int, vocab: int) -> None:
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
    print(sum(p.numel() for p in model.parameters()))


def load(directory: str, preset: str | None, device: str) -> None:
    from contextlib import nullcontext

    from transformers import AutoModelForCausalLM

    import lowbit
    from lowbit.compress.loading import init_quantized_weights

    context = init_quantized_weights(copy.deepcopy(getattr(lowbit, preset))) if preset else nullcontext()
    if device == "cuda":
        with context:
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, device_map="cuda")
        print(torch.cuda.max_memory_allocated())
        return
    start = anonymous_bytes()
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], anonymous_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with context:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    done.set()
    sampler.join()
    peak[0] = max(peak[0], anonymous_bytes())
    del model
    print(peak[0] - start)


def sizes(hidden: int, layers: int, intermediate: int, vocab: int) -> None:
    """Packed bytes / bf16 bytes of every Linear weight of a Llama built on the meta device, materialised
    one Linear at a time with random bf16 weights (lm_head stays dense, as the presets keep it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.compress.packed import WeightFormat, quantize_weight

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 512))
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    formats = {"int4 g128": WeightFormat("int", 4, block_size=128), "nvfp4": WeightFormat("nvfp4", (2, 1), 16),
               "fp8 e4m3 per-tensor": WeightFormat("float", (4, 3))}
    packed = dict.fromkeys(formats, 0)
    dense = 0
    generator = torch.Generator().manual_seed(0)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            weight = (torch.randn(module.weight.shape, generator=generator) * 0.02).to(torch.bfloat16)
            dense += weight.numel() * 2
            for key, fmt in formats.items():
                packed[key] += quantize_weight(weight, fmt).nbytes
    total = sum(p.numel() for p in model.parameters())
    print(f"parameters {total}, quantized Linear weights {dense // 2}")
    for key, value in packed.items():
        print(f"{key}: {value} B / {dense} B bf16 = {value / dense:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["save", "load", "sizes"])
    parser.add_argument("directory", nargs="?")
    parser.add_argument("--preset")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=1024)
    args = parser.parse_args()
    if args.action == "sizes":
        sizes(args.hidden, args.layers, args.intermediate, args.vocab)
    elif args.action == "save":
        save(args.directory, args.hidden, args.layers, args.intermediate, args.vocab)
    else:
        load(args.directory, args.preset, args.device)


if __name__ == "__main__":
    main()
