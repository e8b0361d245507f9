"""End-to-end generation speed: bf16 against every compressed format, side by side in one process.

    python bench/e2e.py --device cpu --out bench/results                      # e2e_cpu_<date>.md
    python bench/e2e.py --device cuda --models random --layers 8 32 --compile # e2e_cuda_<date>.md

Models: ``random`` is a Llama of ``--hidden`` / ``--intermediate`` / ``--layers`` (``--heads`` / ``--kv-heads``,
vocabulary 32000), random weights from a fixed seed (``transformers``' own initialisation, built once per format
from the same seed: no copy of the dense model is needed); ``bundled`` is ``lowbit.assets.load_default_model``.
Each format quantizes the bf16 model with its preset (``max`` calibration on one seeded batch of 64 random
tokens) and ``compress``es it. The ``ceiling`` row replaces every decoder Linear by ``TiledInput`` (its input
repeated to the output width, no weight read): what a weight kernel of zero cost would leave of the model's
per-token work. The ``torchao_*`` rows apply torchao's recipes (``torchao_config``) to the same decoder Linears
(``quantize_``; torchao is never a lowbit dependency: on the GPU machine it travels as a wheel), so every lowbit
format is compared with every torchao path in the same run.

Protocol: HF ``generate`` (greedy, ``--new-tokens`` new tokens after a ``--prompt``-token seeded prompt, batch 1,
end-of-sequence ignored), with ``--compile`` a static cache (on CUDA transformers compiles the decode step:
Inductor, CUDA graphs, ``fullgraph=True`` so that a graph break fails the row; on the CPU transformers compiles
nothing, so there the rows are the static cache, eager) else the default dynamic cache, eager. One warm-up generate
per model, then ``--repeats`` rounds; each round times every format once, in a fixed order, so that the machine's
load falls on all of them alike. Per round, each format's tok/s (new tokens over the generate's wall time, its
short prefill included) is divided by bf16's in the same round; the table gives the median tok/s and the median of
those per-round ratios. Prefill: the wall time of one eager forward over ``--prefill`` tokens (median of the
rounds, ratio bf16 time / format's).
``host us/call``: a compressed layer of the format at 256 x 256 called 2000 times on one activation row, each
call timed alone with no synchronisation (on CUDA the launch returns at once; the kernel's own time is far
under the host's at that shape), median call (robust to the calls a loaded machine preempts); the bf16 row
is ``nn.Linear`` of the same shape. It is what a user's eager call costs: on CUDA the layer's first call captures
its CUDA graph (``lowbit.kernels.eager_graphs``), one of the 20 untimed warm-up calls; ``ungraphed us/call`` (CUDA)
times the same layer with the graphs switched off. Peak memory (CUDA): ``torch.cuda.max_memory_allocated`` over
the generate calls of that format, reset between models.
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import statistics
import subprocess
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
from lowbit.kernels import eager_graphs  # noqa: E402

PRESETS = {
    "bf16": None,
    "int4_g128": "INT4_BLOCKWISE_WEIGHT_ONLY_CFG",
    "int8_wo": "INT8_WEIGHT_ONLY_CFG",
    "nvfp4_wo": "W4A16_NVFP4_CFG",
    "fp8_w8a8": "FP8_DEFAULT_CFG",
    "fp8_wo": "FP8_DEFAULT_CFG",  # its weight (E4M3 per tensor), the activations left unquantized (quant_config)
    "ceiling": None,
    "torchao_int4": None,
    "torchao_int8_wo": None,
    "torchao_fp8": None,
}
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VOCAB = 32000
SEED = 0
HOST_SHAPE = 256
HOST_CALLS = 2000
STARTED = time.monotonic()


def quant_config(fmt: str) -> dict:
    """A copy of ``fmt``'s lowbit preset; weight-only formats (``*_wo``) with the input quantizers off."""
    config = copy.deepcopy(getattr(lowbit, PRESETS[fmt]))
    if fmt.endswith("_wo"):
        config["quant_cfg"]["*input_quantizer"] = {"enable": False}
    return config


class TiledInput(nn.Module):
    """Stands in for a Linear (in -> out) that reads no weight: the input repeated along its last dim, cut to
    ``out`` columns."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.repeats = math.ceil(out_features / in_features)
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(*([1] * (x.dim() - 1)), self.repeats)[..., : self.out_features]


def torchao_config(fmt: str):
    """torchao's recipe for a ``torchao_*`` row: int4 g128 on its tinygemm layout (``tile_packed_to_4d``; its
    default ``plain`` layout needs fbgemm-gpu-genai), int8 weight-only per channel, fp8 e4m3 W8A8 per row."""
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int4WeightOnlyConfig,
        Int8WeightOnlyConfig,
        PerRow,
    )

    return {"torchao_int4": lambda: Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"),
            "torchao_int8_wo": Int8WeightOnlyConfig,
            "torchao_fp8": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())}[fmt]()


def random_llama(args, device: str) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.num_layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, vocab_size=VOCAB,
                         max_position_embeddings=max(4096, args.prefill + args.prompt + args.new_tokens))
    torch.manual_seed(SEED)
    with torch.device(device):  # built in bf16 (no float32 copy: a 32-layer 4096/14336 model is 14 GB in bf16)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def bundled(args, device: str) -> nn.Module:
    from lowbit.assets import load_default_model

    return load_default_model(torch.bfloat16, device)[0]


def build(model_name: str, fmt: str, args) -> nn.Module:
    """The bf16 model in format ``fmt`` (see the module docstring)."""
    model = (random_llama if model_name == "random" else bundled)(args, args.device)
    model.generation_config.eos_token_id = None
    if fmt == "ceiling":
        for name, module in list(model.named_modules()):
            if name.rsplit(".", 1)[-1] in DECODER_LINEARS:
                model.set_submodule(name, TiledInput(module.in_features, module.out_features))
    elif fmt.startswith("torchao_"):
        from torchao.quantization import quantize_

        quantize_(model, torchao_config(fmt),
                  filter_fn=lambda module, name: name.rsplit(".", 1)[-1] in DECODER_LINEARS)
    elif PRESETS[fmt] is not None:
        batch = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(SEED))
        config = quant_config(fmt)
        with torch.no_grad():
            model = compress(lowbit.quantize(model, config, lambda m: m(batch.to(args.device))))
    return model


def past_deadline(args) -> bool:
    """Whether ``--deadline`` seconds have passed since the script started (a lease-limited run stops adding
    formats and rounds there, keeping what it measured)."""
    return args.deadline is not None and time.monotonic() - STARTED > args.deadline


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def generate_seconds(model: nn.Module, prompt: torch.Tensor, args) -> float:
    options = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                   pad_token_id=0)
    if args.compile:
        from transformers import CompileConfig

        options.update(cache_implementation="static", compile_config=CompileConfig(fullgraph=True))
    synchronize(args.device)
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(prompt, **options)
    synchronize(args.device)
    assert out.shape[1] == prompt.shape[1] + args.new_tokens
    return time.perf_counter() - started


def prefill_seconds(model: nn.Module, tokens: torch.Tensor, device: str) -> float:
    synchronize(device)
    started = time.perf_counter()
    with torch.inference_mode():
        model(tokens, use_cache=False, logits_to_keep=1)
    synchronize(device)
    return time.perf_counter() - started


def host_microseconds(fmt: str, device: str) -> tuple[float | None, float | None]:
    """Wall time per call of one layer of ``fmt`` at HOST_SHAPE, M = 1, unsynchronised (module docstring): as a
    user's eager call runs, and with lowbit's eager CUDA graphs off (None off CUDA and for bf16)."""
    generator = torch.Generator().manual_seed(SEED)
    layer = nn.Sequential(nn.Linear(HOST_SHAPE, HOST_SHAPE, bias=False)).to(device, torch.bfloat16)
    x = torch.randn(1, 1, HOST_SHAPE, generator=generator).to(device, torch.bfloat16)
    if PRESETS.get(fmt):
        layer = compress(lowbit.quantize(layer, quant_config(fmt), lambda m: m(x)))
    elif fmt != "bf16":
        return None, None
    graphed = median_call_seconds(layer, x, device)
    if device != "cuda" or fmt == "bf16":
        return graphed * 1e6, None
    eager_graphs.ENABLED = False
    try:
        ungraphed = median_call_seconds(layer, x, device)
    finally:
        eager_graphs.ENABLED = True
    return graphed * 1e6, ungraphed * 1e6


def median_call_seconds(layer: nn.Module, x: torch.Tensor, device: str) -> float:
    """The median of HOST_CALLS timed calls after 20 untimed ones (the first of which captures any graph)."""
    calls = []
    with torch.inference_mode():
        for _ in range(20):
            layer(x)
        synchronize(device)
        for _ in range(HOST_CALLS):
            started = time.perf_counter()
            layer(x)
            calls.append(time.perf_counter() - started)
        synchronize(device)
    return statistics.median(calls)


def run_model(model_name: str, args) -> list[dict]:
    formats = args.formats
    generator = torch.Generator().manual_seed(SEED + 1)
    models, peaks, failed = {}, {}, []
    vocab = None
    for fmt in formats:
        try:
            models[fmt] = build(model_name, fmt, args)
        except Exception as error:  # a format that cannot build is a row saying why, not a lost run
            failed.append({"model": model_name, "format": fmt, "tok/s": f"failed: {type(error).__name__}: {error}"})
            print(failed[-1], flush=True)
            continue
        vocab = models[fmt].config.vocab_size
        print(f"built {model_name} {fmt}", flush=True)
    prompt = torch.randint(0, vocab, (1, args.prompt), generator=generator).to(args.device)
    long_prompt = torch.randint(0, vocab, (1, args.prefill), generator=generator).to(args.device)
    for fmt, model in list(models.items()):  # warm-up (compilation), peak memory
        if fmt != "bf16" and past_deadline(args):  # bf16 is every ratio's baseline
            failed.append({"model": model_name, "format": fmt, "tok/s": "skipped: --deadline reached before warm-up"})
            del models[fmt]
            continue
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            generate_seconds(model, prompt, args)
            prefill_seconds(model, long_prompt, args.device)
        except Exception as error:
            failed.append({"model": model_name, "format": fmt,
                           "tok/s": f"failed: {type(error).__name__}: {str(error)[:300]}"})
            print(failed[-1], flush=True)
            del models[fmt]
            continue
        if args.device == "cuda":
            peaks[fmt] = torch.cuda.max_memory_allocated() / 2**30
        print(f"warmed up {fmt}", flush=True)
    formats = list(models)
    speed = {fmt: [] for fmt in formats}
    prefill = {fmt: [] for fmt in formats}
    for repeat in range(args.repeats):
        if repeat and past_deadline(args):
            print(f"--deadline reached: {repeat} rounds", flush=True)
            break
        for fmt, model in models.items():
            speed[fmt].append(args.new_tokens / generate_seconds(model, prompt, args))
            prefill[fmt].append(prefill_seconds(model, long_prompt, args.device))
        print(f"round {repeat}: " + ", ".join(f"{fmt} {speed[fmt][-1]:.1f}" for fmt in formats), flush=True)
    rows = []
    ceiling = statistics.median(s / b for s, b in zip(speed.get("ceiling", []), speed["bf16"], strict=False)) \
        if "ceiling" in speed else None
    for fmt in formats:
        ratio = statistics.median(s / b for s, b in zip(speed[fmt], speed["bf16"], strict=True))
        prefill_ratio = statistics.median(b / s for s, b in zip(prefill[fmt], prefill["bf16"], strict=True))
        row = {"model": model_name, "format": fmt, "tok/s": round(statistics.median(speed[fmt]), 1),
               "x bf16": round(ratio, 2), "rounds": len(speed[fmt]),
               f"prefill {args.prefill} ms": round(statistics.median(prefill[fmt]) * 1e3, 1),
               "prefill x bf16": round(prefill_ratio, 2)}
        if ceiling is not None and fmt not in ("bf16", "ceiling"):
            row["share of ceiling gain"] = round((ratio - 1) / (ceiling - 1), 2) if ceiling > 1 else ""
        if peaks:
            row["peak GiB"] = round(peaks[fmt], 2)
        host, ungraphed = host_microseconds(fmt, args.device)
        row["host us/call"] = "" if host is None else round(host, 1)
        if args.device == "cuda":
            row["ungraphed us/call"] = "" if ungraphed is None else round(ungraphed, 1)
        rows.append(row)
        print(row, flush=True)
    del models
    return rows + failed


def environment(args) -> list[str]:
    import transformers

    device = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or platform.machine())
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return [f"Device: {device}; {torch.get_num_threads()} CPU threads; torch {torch.__version__}; "
            f"transformers {transformers.__version__}  ", f"Load (uptime, at the end): {load}  "]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", nargs="+", default=["random", "bundled"], choices=["random", "bundled"])
    parser.add_argument("--formats", default="bf16,int4_g128,int8_wo,nvfp4_wo,fp8_w8a8,ceiling",
                        help=f"comma-separated, from {list(PRESETS)} (bf16 always runs)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--layers", type=int, nargs="+", default=[4])
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prefill", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU intra-op threads")
    parser.add_argument("--compile", action="store_true", help="static cache: transformers compiles the decode step")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds after which no further format warms up and no further round starts")
    parser.add_argument("--stem", default=None, help="results file stem (default e2e_<device>)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    formats = ["bf16"] + [f for f in args.formats.split(",") if f and f != "bf16"]
    unknown = [f for f in formats if f not in PRESETS]
    if unknown:
        parser.error(f"--formats: unknown {unknown}; allowed are {list(PRESETS)}")
    args.formats = formats
    torch.set_num_threads(args.threads)
    if args.compile:  # one compiled decode step per model: more cache entries than dynamo's default of 8
        torch._dynamo.config.cache_size_limit = 64
    rows = []
    for model_name in args.models:
        for layers in (args.layers if model_name == "random" else [None]):
            args.num_layers = layers
            label = f"random {args.hidden}/{args.intermediate} x{layers}" if layers else "bundled"
            rows += [{**row, "model": label} for row in run_model(model_name, args)]
    text = "\n".join([
        f"# End-to-end generation, bf16 vs compressed formats ({args.device})", "",
        f"Command: `python bench/e2e.py {' '.join(sys.argv[1:])}`  ",
        *environment(args),
        f"Protocol: bench/e2e.py's docstring; {args.repeats} interleaved rounds, medians; "
        f"{args.new_tokens} new tokens after {args.prompt}; {'static cache, compiled' if args.compile else 'eager'}  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
        "```", format_table(rows), "```", "",
    ])
    from accuracy import write_report  # bench/ is not a package

    write_report(text, args.out, args.stem or f"e2e_{args.device}")


if __name__ == "__main__":
    main()
