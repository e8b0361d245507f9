"""Where lowbit's prefill loses time: each piece of a compressed Linear at prefill row counts, against bf16.

    python bench/prefill_parts.py --device cuda --out bench/results   # prefill_parts_cuda_<date>.md, ~2.5 min, H100
    python bench/prefill_parts.py --smoke                               # CPU, tiny shapes: the code paths, no figures

Shapes: the Linears of a Llama 4096/14336 with GQA 32/8 (N x K = out x in): q/o 4096 x 4096, k/v 1024 x 4096,
gate/up 14336 x 4096, down 4096 x 14336; rows M = 2048 and 512 (``--rows``). Weights: seeded random bf16 (normal,
0.1% outliers x20), each format built by lowbit's public path (``lowbit.quantize`` with the format's preset on an
``nn.Linear``, ``max`` calibration on the timed activations, then ``compress``), so every piece runs on the real
packed operands of a ``CompressedLinear``.

Pieces (``piece`` column):
- ``bf16``: ``F.linear`` on the bf16 weight. ``module``: the ``CompressedLinear`` call as ``compress`` prepared it.
- INT4 g128 (``INT4_BLOCKWISE_WEIGHT_ONLY_CFG``) and NVFP4 weight-only (``W4A16_NVFP4_CFG``), whose module runs
  ``w4_dequantize`` then cuBLAS at these rows: ``dequantize`` (the kernel alone), ``GEMM on dequantized`` (cuBLAS on
  the ready bf16 weight), ``fused <config>`` (candidate: the Triton W4A16 tensor-core kernel ``w4_matmul`` with
  large-M tiles). The first run (bench/results/prefill_parts_cuda_2026-12-07.md, commit 3e6e30b) also timed
  ``sliced <MB> x<streams>``: N slices of bf16 weight dequantized into reused L2-sized buffers, the GEMM writing the
  output's column slice, on one or two streams (``lowbit/kernels/w4_sliced.py`` there): slower on every shape,
  removed since.
- FP8 W8A8, per tensor (``FP8_DEFAULT_CFG``: static activation amax, per-tensor weight scale) and per row
  (``FP8_PER_CHANNEL_PER_TOKEN_CFG``: dynamic per-token activation scales, per-channel weight): ``act quant``
  (the Triton kernel ``fp8_quant.quantize_fp8`` alone), ``scaled_mm`` (``torch._scaled_mm`` on ready codes),
  ``scaled_mm fast accum`` (``use_fast_accum=True``: Hopper's FP8 sums not promoted to float32 every few K steps),
  ``fp8_linear fast accum`` (both), ``module M-1`` (M - 1 rows: the padding to a multiple of 16).

Timing: ``gpu us`` is GPU time: the piece captured once in a CUDA graph, the replay timed with CUDA events, the L2
cache flushed (a 256 MB write) before every replay, median of ``--reps``; pieces that cannot be captured are timed
eagerly (marked ``*``). ``eager us`` (module and bf16 rows): ``--calls`` back-to-back eager calls between two
events, no flush, per call: it includes host launch time where that exceeds the GPU time; ``host us``: the host's
wall time per call of the same loop before its synchronisation (the launch queue does not fill in 20 calls).
``x bf16``: bf16's gpu us over the piece's, same shape and M, same run. ``err``: ``||y - y64|| / ||y64||``
against a float64 product of the same operands (the dequantized weight; for FP8 the activation codes times the
weight codes, scales applied); ``= module``: output bit-identical to the module's. The per-layer table sums each
path over a decoder layer's 7 Linears (2 q/o, 2 k/v, 2 gate/up, 1 down).

Model: a random ``LlamaForCausalLM`` of the same widths and ``--layers`` layers, one eager forward over M=2048
tokens (``use_cache=False``, ``logits_to_keep=1``) per format (``fp8 tensor fast accum``: FP8_DEFAULT_CFG with
``CompressedLinear.fp8_fast_accumulation``): wall time (CUDA events, median of 5), the GPU busy
time (sum of the kernels' durations in one profiled forward: wall minus busy is time the GPU waited for the host),
the host's time to issue the forward (``host ms``, before synchronising: close to wall = host-bound),
the kernels that took the most GPU time, and the number of host-device synchronisations
(``torch.cuda.set_sync_debug_mode``).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lowbit  # noqa: E402
from lowbit.compress import compress  # noqa: E402
from lowbit.compress.linear import CompressedLinear  # noqa: E402
from lowbit.kernels import Fp8Weight, dispatch, fp8_linear  # noqa: E402

SHAPES = {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)}  # (N, K)
PER_LAYER = {"q/o": 2, "k/v": 2, "gate/up": 2, "down": 1}
SMOKE_DIVISOR = 16  # --smoke divides every width by this (K stays a multiple of 128)
W4_PRESETS = {"int4": "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "nvfp4": "W4A16_NVFP4_CFG"}
FP8_PRESETS = {"fp8 tensor": "FP8_DEFAULT_CFG", "fp8 row": "FP8_PER_CHANNEL_PER_TOKEN_CFG"}
FAST = " fast accum"  # a model row with CompressedLinear.fp8_fast_accumulation set
FUSED_CONFIGS = {
    "n128 m128 w8 s3": dict(BLOCK_N=128, BLOCK_M=128, num_warps=8, num_stages=3),
    "n256 m128 w8 s3": dict(BLOCK_N=256, BLOCK_M=128, num_warps=8, num_stages=3),
}
L2_FLUSH_BYTES = 256 << 20
SEED = 0
STARTED = time.monotonic()


def random_weight(n: int, k: int, generator: torch.Generator, device: str, scale: float) -> torch.Tensor:
    values = torch.randn(n, k, generator=generator, device=device) * scale
    outliers = torch.rand(n, k, generator=generator, device=device) < 1e-3
    return torch.where(outliers, values * 20, values).to(torch.bfloat16)


def compressed_linear(weight: torch.Tensor, preset: str, x: torch.Tensor) -> nn.Module:
    """``weight`` (N, K) as the CompressedLinear that lowbit.quantize + compress make of it with ``preset``."""
    n, k = weight.shape
    layer = nn.Sequential(nn.Linear(k, n, bias=False, device=weight.device, dtype=weight.dtype))
    layer[0].weight.data.copy_(weight)
    with torch.no_grad():
        return compress(lowbit.quantize(layer, copy.deepcopy(getattr(lowbit, preset)), lambda m: m(x)))[0]


class Timer:
    """GPU time of a callable (CUDA graph replay after an L2 flush, CUDA events), or wall time in --smoke."""

    def __init__(self, device: str, reps: int, calls: int):
        self.cuda = device == "cuda"
        self.reps = reps
        self.calls = calls
        self.flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device) if self.cuda else None

    def gpu_us(self, fn: Callable[[], torch.Tensor]) -> tuple[float, bool]:
        """(median us, captured); ``fn`` has run once already."""
        if not self.cuda:
            return self._wall_us(fn), False
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                fn()
            run, captured = graph.replay, True
        except RuntimeError as error:
            print(f"  not captured ({error!r:.120}): timed eagerly", flush=True)
            graph, run, captured = None, fn, False
        run()
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(self.reps)]
        for start, end in pairs:
            self.flush.zero_()
            start.record()
            run()
            end.record()
        torch.cuda.synchronize()
        del graph
        return statistics.median(s.elapsed_time(e) for s, e in pairs) * 1e3, captured

    def eager_us(self, fn: Callable[[], torch.Tensor]) -> tuple[float, float]:
        """(GPU-clock us, host us) per call of ``self.calls`` back-to-back eager calls, no flush: the first
        includes host time where it dominates, the second is the host's wall time before synchronising."""
        if not self.cuda:
            return self._wall_us(fn), self._wall_us(fn)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        started = time.perf_counter()
        start.record()
        for _ in range(self.calls):
            fn()
        end.record()
        host = (time.perf_counter() - started) * 1e6 / self.calls
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1e3 / self.calls, host

    def _wall_us(self, fn) -> float:
        started = time.perf_counter()
        fn()
        return (time.perf_counter() - started) * 1e6


class Pieces:
    """Rows of the table for one (shape, M): ``record`` times a piece and checks its output."""

    def __init__(self, timer: Timer, shape: str, m: int):
        self.timer, self.shape, self.m = timer, shape, m
        self.rows: list[dict] = []
        self.failed: list[str] = []

    def record(self, piece: str, fn, reference: torch.Tensor | None = None, module_out: torch.Tensor | None = None,
               eager: bool = False) -> torch.Tensor | None:
        try:
            with torch.inference_mode():
                out = fn()
                us, captured = self.timer.gpu_us(fn)
                eager_us, host_us = self.timer.eager_us(fn) if eager else (None, None)
        except Exception as error:  # the table says "-", the log says why
            print(f"  {piece} failed at {self.shape} M={self.m}: {error!r:.300}", flush=True)
            self.failed.append(piece)
            return None
        err = None if reference is None else ((out.double() - reference).norm() / reference.norm()).item()
        same = None if module_out is None else torch.equal(out, module_out)
        self.rows.append(dict(shape=self.shape, M=self.m, piece=piece, us=us, captured=captured, eager_us=eager_us,
                              host_us=host_us, err=err, same=same))
        return out


def w4_pieces(pieces: Pieces, name: str, layer: nn.Module, x: torch.Tensor, x64: torch.Tensor) -> None:
    """The W4A16 module, its two halves and the fused candidates (module docstring)."""
    packed = layer.packed
    arguments = dispatch.triton_arguments(packed)
    kernels = dispatch.triton_w4()
    reference = x64 @ packed.dequantize(torch.float64).T
    module_out = pieces.record(f"{name} module", lambda: layer(x), reference, eager=True)
    dequantized = pieces.record(f"{name} dequantize", lambda: kernels.w4_dequantize(
        packed.codes, packed.scale, dtype=x.dtype, **arguments))
    if dequantized is not None:
        pieces.record(f"{name} GEMM on dequantized", lambda: F.linear(x, dequantized), reference, module_out)
    for label, config in FUSED_CONFIGS.items():
        config = {**config, "SPLIT_K": 1, "UNROLL": 1, "X_PERMUTED": True,
                  "SCALE_AFTER_DOT": arguments["kind"] != "nvfp4" and arguments["group_size"] % 128 == 0}
        pieces.record(f"{name} fused {label}", lambda c=config: kernels.w4_matmul(
            x, packed.codes, packed.scale, config=c, **arguments), reference, module_out)


def fp8_pieces(pieces: Pieces, name: str, layer: nn.Module, x: torch.Tensor) -> None:
    """The FP8 W8A8 module, its activation quantization and ``_scaled_mm`` (module docstring)."""
    from lowbit.kernels.fp8_quant import quantize_fp8
    from lowbit.kernels.scaled import FP8_ROW_MULTIPLE

    packed = layer.packed
    weight = Fp8Weight.from_codes(packed.codes, packed.scale)
    quantizer = layer.input_quantizer
    amax = None if quantizer.config.is_dynamic else quantizer.amax.detach().float().reshape(1)
    tensor_wise = amax is not None and weight.inverse_scale.numel() == 1
    m = x.shape[0]
    padded = m + (-m % FP8_ROW_MULTIPLE)
    x_codes, x_inverse = quantize_fp8(x, amax, padded, row_scales=not tensor_wise)
    x_hat = x_codes[:m].double() * x_inverse.double().reshape(-1, 1)[:m]  # () or (padded, 1) inverse scales
    reference = x_hat @ (packed.codes.double() * weight.inverse_scale_row.double().reshape(-1, 1)).T
    module_out = pieces.record(f"{name} module", lambda: layer(x), reference, eager=True)
    pieces.record(f"{name} act quant", lambda: quantize_fp8(x, amax, padded, row_scales=not tensor_wise)[0])
    scale_b = weight.inverse_scale if tensor_wise else weight.inverse_scale_row
    for fast in (False, True):
        label = f"{name} scaled_mm" + (" fast accum" if fast else "")
        pieces.record(label, lambda f=fast: torch._scaled_mm(x_codes, weight.codes.t(), scale_a=x_inverse,
                                                             scale_b=scale_b, out_dtype=torch.bfloat16,
                                                             use_fast_accum=f)[:m], reference, module_out)
    pieces.record(f"{name} fp8_linear fast accum", lambda: fp8_linear(
        x, weight, None, amax, x.dtype, fast_accumulation=True), reference, module_out)
    pieces.record(f"{name} module M-1", lambda: layer(x[1:]), reference[1:], eager=True)


def past_deadline(args) -> bool:
    return time.monotonic() - STARTED > args.deadline


def bench_shapes(args, m: int, timer: Timer, generator: torch.Generator) -> list[Pieces]:
    done = []
    divisor = SMOKE_DIVISOR if args.smoke else 1
    for shape, (n, k) in SHAPES.items():
        if past_deadline(args):
            print(f"deadline: {shape} M={m} and later skipped", flush=True)
            break
        done.append(bench_shape(args, Pieces(timer, shape, m), n // divisor, k // divisor, generator))
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return done


def bench_shape(args, pieces: Pieces, n: int, k: int, generator: torch.Generator) -> Pieces:
    """Every piece of the module docstring for one (N, K) weight and M rows."""
    weight = random_weight(n, k, generator, args.device, scale=0.02)
    x = random_weight(pieces.m, k, generator, args.device, scale=1.0)
    x64 = x.double()
    pieces.record("bf16", lambda: F.linear(x, weight), x64 @ weight.double().T, eager=True)
    for name, preset in {**W4_PRESETS, **FP8_PRESETS}.items():
        if name.startswith("fp8") and not args.smoke and torch.cuda.get_device_capability() < (8, 9):
            continue
        layer = compressed_linear(weight, preset, x)
        if name in W4_PRESETS:
            w4_pieces(pieces, name, layer, x, x64)
        else:
            fp8_pieces(pieces, name, layer, x)
    for row in pieces.rows:
        print_row(row, pieces.rows[0]["us"])
    return pieces


def print_row(row: dict, bf16_us: float) -> None:
    eager = "" if row["eager_us"] is None else f"  eager {row['eager_us']:.1f} host {row['host_us']:.1f} us/call"
    err = "" if row["err"] is None else f"  err {row['err']:.1e}"
    same = "" if row["same"] is None else f"  same bits as module: {row['same']}"
    print(f"{row['shape']:>8} M={row['M']:<5} {row['piece']:<34} {row['us']:9.1f} us"
          f"{'' if row['captured'] else '*'}  {bf16_us / row['us']:.2f}x{eager}{err}{same}", flush=True)


def layer_sums(done: list[Pieces]) -> list[dict]:
    """Each piece's time summed over a decoder layer's 7 Linears, where every shape measured it."""
    by_piece: dict[str, dict[str, dict]] = {}
    for pieces in done:
        for row in pieces.rows:
            by_piece.setdefault(row["piece"], {})[row["shape"]] = row
    sums = []
    for piece, shapes in by_piece.items():
        if set(shapes) != set(SHAPES):
            continue
        total = sum(PER_LAYER[s] * shapes[s]["us"] for s in SHAPES)
        eager = host = None
        if all(shapes[s]["eager_us"] is not None for s in SHAPES):
            eager = sum(PER_LAYER[s] * shapes[s]["eager_us"] for s in SHAPES)
            host = sum(PER_LAYER[s] * shapes[s]["host_us"] for s in SHAPES)
        sums.append(dict(piece=piece, us=total, eager_us=eager, host_us=host))
    return sums


def bench_model(args, formats: dict[str, str | None]) -> list[dict]:
    """One eager prefill of a random Llama per format: wall, GPU busy, top kernels, synchronisations."""
    from transformers import LlamaConfig, LlamaForCausalLM

    divisor = SMOKE_DIVISOR if args.smoke else 1
    tokens = 64 if args.smoke else 2048
    config = LlamaConfig(hidden_size=4096 // divisor, intermediate_size=14336 // divisor, num_hidden_layers=args.layers,
                         num_attention_heads=32 // min(divisor, 8), num_key_value_heads=8 // min(divisor, 8),
                         vocab_size=32000 // divisor, max_position_embeddings=4096)
    prompt = torch.randint(0, config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(SEED))
    prompt = prompt.to(args.device)
    results = []
    for fmt, preset in formats.items():
        if past_deadline(args):
            print(f"deadline: model rows from {fmt} skipped", flush=True)
            break
        torch.manual_seed(SEED)
        with torch.device(args.device):
            model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
        if preset is not None:
            with torch.no_grad():
                model = compress(lowbit.quantize(model, copy.deepcopy(getattr(lowbit, preset)),
                                                 lambda m: m(prompt[:, :64])))
        if fmt.endswith(FAST):
            for module in model.modules():
                if isinstance(module, CompressedLinear):
                    module.fp8_fast_accumulation = True
                    module.prepare(torch.bfloat16)
        try:
            results.append({"format": fmt, **prefill_profile(model, prompt, args)})
        except Exception as error:
            print(f"  model {fmt} failed: {error!r:.300}", flush=True)
        print(f"model {fmt}: {results[-1] if results and results[-1]['format'] == fmt else '-'}", flush=True)
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return results


def prefill_profile(model: nn.Module, prompt: torch.Tensor, args) -> dict:
    def forward():
        with torch.inference_mode():
            model(prompt, use_cache=False, logits_to_keep=1)

    for _ in range(2):
        forward()
    if args.device != "cuda":
        started = time.perf_counter()
        forward()
        return {"wall ms": round((time.perf_counter() - started) * 1e3, 2)}
    walls, hosts = [], []
    for _ in range(5):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        started = time.perf_counter()
        start.record()
        forward()
        end.record()
        hosts.append((time.perf_counter() - started) * 1e3)
        torch.cuda.synchronize()
        walls.append(start.elapsed_time(end))
    result = {"wall ms": round(statistics.median(walls), 2), "host ms": round(statistics.median(hosts), 2)}
    try:
        result.update(busy_and_syncs(forward))
    except Exception as error:  # the wall time stands; the log says why the rest is missing
        print(f"  profile failed: {error!r:.300}", flush=True)
    return result


def busy_and_syncs(forward: Callable[[], None]) -> dict:
    """Host-device synchronisations in one call of ``forward`` (sync debug mode's warnings), the sum of its
    kernels' GPU time (one profiled call) and the kernels that took most of it."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            forward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        forward()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.self_device_time_total for e in kernels) / 1e3
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:6]
    return {"GPU busy ms": round(busy, 2), "syncs": sum("synchroniz" in str(w.message) for w in caught),
            "top kernels": "; ".join(f"{e.key[:60]} {e.self_device_time_total / 1e3:.2f} ms x{e.count}" for e in top)}


def markdown(args, tables: dict[int, list[Pieces]], model_rows: list[dict]) -> str:
    import triton

    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (--smoke: no figures)"
    lines = ["# Prefill pieces of lowbit's compressed Linears, CUDA", "",
             f"- device: {device}; torch {torch.__version__}, triton {triton.__version__}, "
             f"CUDA {torch.version.cuda}, python {platform.python_version()}",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"- command: `python {' '.join(sys.argv)}`",
             "- protocol: bench/prefill_parts.py's docstring (gpu us: CUDA-graph replay after an L2 flush, median of "
             f"{args.reps}; eager / host us: {args.calls} back-to-back eager calls, no flush; * = not captured)", ""]
    for m, done in tables.items():
        lines += [f"## M = {m}", "", "| shape | piece | gpu us | x bf16 | eager us | host us | err | = module |",
                  "|---|---|---|---|---|---|---|---|"]
        for pieces in done:
            base = pieces.rows[0]["us"] if pieces.rows else float("nan")
            for row in pieces.rows:
                same = "" if row["same"] is None else ("yes" if row["same"] else "no")
                lines.append(f"| {row['shape']} | {row['piece']} | {row['us']:.1f}{'' if row['captured'] else '*'} | "
                             f"{base / row['us']:.2f} | {_number(row['eager_us'], '.1f')} | "
                             f"{_number(row['host_us'], '.1f')} | "
                             f"{_number(row['err'], '.1e')} | {same} |")
        sums = layer_sums(done)
        if sums:
            base = next(s for s in sums if s["piece"] == "bf16")
            lines += ["", f"Per decoder layer (7 Linears), M = {m}:", "",
                      "| piece | gpu us | x bf16 | eager us | x bf16 eager | host us |", "|---|---|---|---|---|---|"]
            for s in sums:
                eager_ratio = "" if s["eager_us"] is None else f"{base['eager_us'] / s['eager_us']:.2f}"
                lines.append(f"| {s['piece']} | {s['us']:.1f} | {base['us'] / s['us']:.2f} | "
                             f"{_number(s['eager_us'], '.1f')} | {eager_ratio} | {_number(s['host_us'], '.1f')} |")
        lines.append("")
    if model_rows:
        lines += [f"## Model: random Llama 4096/14336, {args.layers} layers, eager prefill of 2048 tokens", "",
                  "| format | wall ms | x bf16 | host ms | GPU busy ms | syncs | top kernels |",
                  "|---|---|---|---|---|---|---|"]
        base = model_rows[0]["wall ms"]
        lines += [f"| {r['format']} | {r['wall ms']} | {base / r['wall ms']:.2f} | {r.get('host ms', '-')} | "
                  f"{r.get('GPU busy ms', '-')} | "
                  f"{r.get('syncs', '-')} | {r.get('top kernels', '-')} |" for r in model_rows]
    return "\n".join(lines) + "\n"


def _number(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda"], help="CUDA only (--smoke runs on the CPU)")
    parser.add_argument("--rows", type=int, nargs="*", default=[2048, 512])
    parser.add_argument("--reps", type=int, default=25)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the model rows (0: none)")
    parser.add_argument("--deadline", type=float, default=120.0, help="seconds after which no new shape/format starts")
    parser.add_argument("--out", type=Path, default=None, help="folder for prefill_parts_cuda_<date>.md")
    parser.add_argument("--smoke", action="store_true", help="CPU, widths / 16, 16 rows: the code paths, no figures")
    args = parser.parse_args()
    if args.smoke:
        args.device, args.rows, args.reps, args.calls = "cpu", [16], 1, 1
    elif not torch.cuda.is_available():
        raise SystemExit("bench/prefill_parts.py measures CUDA kernels and needs a CUDA GPU; on the CPU run --smoke")
    generator = torch.Generator(device=args.device).manual_seed(SEED)
    timer = Timer(args.device, args.reps, args.calls)
    tables, model_rows = {}, []
    for index, m in enumerate(args.rows):
        tables[m] = bench_shapes(args, m, timer, generator)
        if index == 0 and args.layers:
            formats = {"bf16": None, **W4_PRESETS, **FP8_PRESETS, "fp8 tensor" + FAST: FP8_PRESETS["fp8 tensor"]}
            model_rows = bench_model(args, formats)
    failed = [f"{p.shape} M={p.m} {name}" for done in tables.values() for p in done for name in p.failed]
    text = markdown(args, tables, model_rows)
    print(text)
    if args.smoke:
        print(f"smoke: {sum(len(p.rows) for done in tables.values() for p in done)} pieces ran, failed: {failed}")
        raise SystemExit(1 if failed else 0)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"prefill_parts_cuda_{datetime.date.today()}.md"
        path.write_text(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
