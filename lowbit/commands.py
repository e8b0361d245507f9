"""``lowbit quantize`` and ``lowbit eval``: one command from a model directory to a saved quantized one.

    lowbit quantize MODEL --preset INT4_AWQ --output DIR [--packed | --export-format hf] [--algorithm gptq]
    lowbit eval MODEL [--eval-tokens 8192] [--text heldout.txt]

MODEL is ``default`` (the bundled model), a local Hugging Face directory, or a directory written by
``lowbit quantize``. After saving, ``quantize`` loads the directory back and checks that its logits on one
calibration batch equal the in-memory model's (and are finite), so a broken export fails here.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from torch import nn

from lowbit.convert import quantize
from lowbit.data import calibration_batches, default_calibration_text, default_eval_text, make_forward_loop
from lowbit.eval import format_table, model_size, perplexity
from lowbit.export import export, export_formats, load_quantized
from lowbit.hf import load_causal_lm, save_quantized, saved_kind
from lowbit.presets import get_preset
from lowbit.report import packed_weight_bytes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RELOAD_TOLERANCE = 1e-4  # max |logit difference| between the saved-and-loaded model and the in-memory one
# Exports store divisor scales (amax / qmax), reloaded as reciprocals: weights agree to one float32 rounding, but
# dynamic activation quantization turns such differences into whole-step flips that grow over depth (measured on
# the bundled model, FP8 per-channel/per-token: 5.3e-3 relative after 8 layers; 1 layer: 3.5e-7).
EXPORT_RELOAD_RTOL = 1e-2
LOADABLE_EXPORTS = ("hf", "compressed-tensors")
MEGABYTE = 1e6


def quantize_config(preset: str | None, config_path: str | None, algorithm: str | None) -> dict:
    """The config from ``--preset`` or ``--config`` (a JSON file), with ``--algorithm`` replacing its
    algorithm (a name, or a JSON object such as ``{"method": "gptq", "block_size": 64}``)."""
    if (preset is None) == (config_path is None):
        raise ValueError("pass exactly one of --preset NAME or --config FILE.json")
    if preset is not None:
        config = get_preset(preset)
    else:
        path = Path(config_path)
        if not path.is_file():
            raise FileNotFoundError(f"--config {config_path!r}: no such file")
        config = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError(f"--config {config_path!r} must hold a JSON object with 'quant_cfg', got {config!r}")
    if algorithm is not None:
        config = {**config, "algorithm": json.loads(algorithm) if algorithm.lstrip().startswith("{") else algorithm}
    return config


def stride(args: argparse.Namespace) -> int:
    """Perplexity windows overlap by half: each scored token sees at least ``seq_len / 2`` of context."""
    return max(1, args.seq_len // 2)


def _texts(path: str | None, default: str) -> str | Path:
    return default if path is None else Path(path)


def check_reload(model: nn.Module, directory: Path, batch: dict[str, torch.Tensor], dtype: torch.dtype) -> float:
    """Max |logit difference| between ``model`` and the copy loaded from ``directory`` on ``batch``.

    Raises RuntimeError when the reloaded logits are not finite or differ by more than RELOAD_TOLERANCE.
    """
    device = next(model.parameters()).device
    reloaded, _ = load_causal_lm(directory, dtype=dtype, device=str(device))
    inputs = {name: tensor[:1].to(device) for name, tensor in batch.items()}
    with torch.no_grad():
        expected = model(**inputs).logits.float()
        actual = reloaded(**inputs).logits.float()
    if not torch.isfinite(actual).all():
        raise RuntimeError(f"the model saved in {directory} gives non-finite logits after loading")
    difference = (actual - expected).abs().max().item()
    if difference > RELOAD_TOLERANCE:
        raise RuntimeError(
            f"the model saved in {directory} gives logits {difference:.3g} away from the in-memory model's "
            f"after loading (tolerance {RELOAD_TOLERANCE})"
        )
    return difference


def show_layer_reports() -> None:
    """Print the ``lowbit`` logger's INFO records (the algorithms' per-layer error reports) to stderr."""
    logger = logging.getLogger("lowbit")
    logger.setLevel(logging.INFO)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)


def run_quantize(args: argparse.Namespace) -> int:
    config = quantize_config(args.preset, args.config, args.algorithm)  # validated before any loading
    if args.packed and args.export_format is not None:
        raise ValueError(f"--packed and --export-format {args.export_format}: an export has its own storage; pass one")
    output = Path(args.output)
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"--output {args.output!r} exists and is not empty")
    show_layer_reports()
    dtype = DTYPES[args.dtype]
    model, tokenizer = load_causal_lm(args.model, dtype=dtype, device=args.device)
    batches = calibration_batches(tokenizer, _texts(args.calib_text, default_calibration_text()),
                                  num_samples=args.calib_samples, seq_len=args.seq_len)
    forward_loop = make_forward_loop(batches, progress=not args.no_progress)
    eval_text = _texts(args.eval_text, default_eval_text())
    rows = []

    def evaluate(name: str, seconds: float | None) -> None:
        ppl = (perplexity(model, tokenizer, eval_text, seq_len=args.seq_len, stride=stride(args),
                          max_tokens=args.eval_tokens, progress=not args.no_progress) if args.eval_tokens else None)
        rows.append({"model": name, "perplexity": None if ppl is None else round(ppl, 3),
                     "weights MB": round(packed_weight_bytes(model) / MEGABYTE, 2),
                     "seconds": None if seconds is None else round(seconds, 2)})

    evaluate("original", None)
    start = time.perf_counter()
    quantize(model, config, forward_loop)
    evaluate(args.preset or Path(args.config).name, time.perf_counter() - start)
    if args.export_format is not None:
        return run_export(model, tokenizer, output, args.export_format, batches[0], rows)
    save_quantized(model, tokenizer, output, packed=args.packed)
    difference = check_reload(model, output, batches[0], dtype)
    print(format_table(rows))
    print(f"saved {saved_kind(output)} checkpoint to {output} ({model_size(model) / MEGABYTE:.2f} MB in memory); "
          f"reloaded: max |logit difference| {difference:.2g}")
    return 0


def run_export(model: nn.Module, tokenizer, output: Path, export_format: str, batch: dict[str, torch.Tensor],
               rows: list[dict]) -> int:
    """Export through the registry; formats ``load_quantized`` reads are loaded back and their logits checked
    against the in-memory model (relative Frobenius difference <= EXPORT_RELOAD_RTOL)."""
    path = export(model, output, export_format, tokenizer=tokenizer)
    print(format_table(rows))
    if export_format not in LOADABLE_EXPORTS:
        print(f"exported {export_format} to {path}")
        return 0
    reloaded = load_quantized(path, device=str(next(model.parameters()).device))
    inputs = {name: tensor[:1].to(next(model.parameters()).device) for name, tensor in batch.items()}
    with torch.no_grad():
        expected, actual = model(**inputs).logits.float(), reloaded(**inputs).logits.float()
    difference = ((actual - expected).norm() / expected.norm()).item()
    if not torch.isfinite(actual).all() or difference > EXPORT_RELOAD_RTOL:
        raise RuntimeError(f"the {export_format} export in {path} reloads with logits {difference:.3g} (relative) "
                           f"away from the in-memory model (tolerance {EXPORT_RELOAD_RTOL})")
    print(f"exported {export_format} to {path}; reloaded with lowbit.load_quantized: relative logit difference "
          f"{difference:.2g}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    model, tokenizer = load_causal_lm(args.model, dtype=DTYPES[args.dtype], device=args.device)
    text = _texts(args.text, default_eval_text())
    start = time.perf_counter()
    ppl = perplexity(model, tokenizer, text, seq_len=args.seq_len, stride=stride(args), max_tokens=args.eval_tokens,
                     progress=not args.no_progress)
    print(format_table([{
        "model": args.model, "kind": "float" if args.model == "default" else saved_kind(args.model),
        "perplexity": round(ppl, 3), "bytes in memory MB": round(model_size(model) / MEGABYTE, 2),
        "seconds": round(time.perf_counter() - start, 2),
    }]))
    return 0


def add_common_arguments(parser: argparse.ArgumentParser, positive_int) -> None:
    """MODEL and the loading / evaluation options both commands take."""
    parser.add_argument("model", help="'default' (the bundled model), or a local Hugging Face / lowbit directory")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="float weights' dtype")
    parser.add_argument("--seq-len", type=positive_int, default=256, help="tokens per window (default: 256)")
    parser.add_argument("--eval-tokens", type=int, default=8192,
                        help="held-out tokens scored; 0 skips the evaluation (default: 8192)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def add_quantize_parser(commands, positive_int) -> None:
    parser = commands.add_parser(
        "quantize", help="quantize a model directory with a preset or config and save it",
        description="Quantize a model (calibrating on a text), report perplexity and size before and after, "
                    "save it with its config and tokenizer, and check that the saved directory loads back.")
    add_common_arguments(parser, positive_int)
    parser.add_argument("--preset", help="a preset name such as INT4_AWQ_CFG or int4_awq (see lowbit.PRESETS)")
    parser.add_argument("--config", help="a JSON file with a ModelOpt-style config ('quant_cfg', 'algorithm')")
    parser.add_argument("--algorithm", help="replace the config's algorithm: a name or a JSON object")
    parser.add_argument("--output", required=True, help="directory to write (must not exist or be empty)")
    parser.add_argument("--packed", action="store_true", help="store packed low-bit weights (lowbit.compress)")
    parser.add_argument("--export-format", choices=export_formats(),
                        help="write this export instead of lowbit's own checkpoint (hf: ModelOpt's unified HF "
                             "checkpoint; compressed-tensors: llm-compressor's; see lowbit.export)")
    parser.add_argument("--calib-text", help=".txt or .jsonl calibration text (default: the bundled one)")
    parser.add_argument("--calib-samples", type=positive_int, default=128, help="calibration windows (default: 128)")
    parser.add_argument("--eval-text", help=".txt or .jsonl evaluation text (default: the bundled held-out one)")
    parser.set_defaults(handler=lambda args, argv: run_quantize(args))


def add_eval_parser(commands, positive_int) -> None:
    parser = commands.add_parser("eval", help="perplexity and in-memory size of a model directory",
                                 description="Score held-out text with a model and report its real size.")
    add_common_arguments(parser, positive_int)
    parser.add_argument("--text", help=".txt or .jsonl text to score (default: the bundled held-out one)")
    parser.set_defaults(handler=lambda args, argv: run_eval(args))
