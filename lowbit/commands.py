"""``lowbit quantize`` and ``lowbit eval``: one command from a model directory to a saved quantized one.

    lowbit quantize MODEL --preset INT4_AWQ --output DIR [--packed | --export-format hf] [--algorithm gptq]
    lowbit quantize MODEL --auto-quantize-bits 4.8 --quant nvfp4,fp8 --output DIR [--search-state FILE.json]
    lowbit eval MODEL [--eval-tokens 8192] [--text heldout.txt] [--reference float|SOURCE|FILE.safetensors]
    lowbit eval FLOAT_MODEL --save-reference FILE.safetensors [--top-k 256]

MODEL is ``default`` (the bundled model), a local Hugging Face directory, or a directory written by
``lowbit quantize`` (which records the float model it came from in ``config.json``, key
``lowbit_float_model``). ``eval --reference`` scores MODEL against a reference (``lowbit.eval.divergence``):
``float`` (the float model MODEL came from; for a float MODEL, MODEL itself in float32), another model
SOURCE (run beside MODEL, window by window), or a top-k file written by ``--save-reference`` (two passes,
for when both models do not fit at once). After saving, ``quantize`` loads the directory back and checks
that its logits on one calibration batch equal the in-memory model's (and are finite), so a broken export
fails here.
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
from lowbit.eval import TopKReference, divergence, format_table, model_size, perplexity, save_topk_reference
from lowbit.export import export, export_formats, load_quantized
from lowbit.files import check_writable
from lowbit.hf import load_causal_lm, save_quantized, saved_kind
from lowbit.presets import get_preset
from lowbit.report import packed_weight_bytes
from lowbit.search.command import add_auto_arguments, auto_formats, run_auto_quantize

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FLOAT_SOURCE_KEY = "lowbit_float_model"  # in a quantized directory's config.json: the model it was made from
DEFAULT_TOP_K = 256
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
    auto = auto_formats(args)
    config = None if auto else quantize_config(args.preset, args.config, args.algorithm)  # validated before loading
    if args.packed and args.export_format is not None:
        raise ValueError(f"--packed and --export-format {args.export_format}: an export has its own storage; pass one")
    try:  # refuse before the long part, as the writer itself would at the end
        output = check_writable(args.output, args.overwrite)
    except FileExistsError as error:
        raise FileExistsError(f"--output: {error} (here: --overwrite)") from None
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
    model.config.update({FLOAT_SOURCE_KEY: args.model if args.model == "default" else str(Path(args.model).resolve())})
    start = time.perf_counter()
    if auto:
        name = run_auto_quantize(model, batches, auto, args)
    else:
        quantize(model, config, forward_loop)
        name = args.preset or Path(args.config).name
    evaluate(name, time.perf_counter() - start)
    if args.export_format is not None:
        return run_export(model, tokenizer, output, args.export_format, batches[0], rows, args.overwrite)
    save_quantized(model, tokenizer, output, packed=args.packed, overwrite=args.overwrite)
    difference = check_reload(model, output, batches[0], dtype)
    print(format_table(rows))
    print(f"saved {saved_kind(output)} checkpoint to {output} ({model_size(model) / MEGABYTE:.2f} MB in memory); "
          f"reloaded: max |logit difference| {difference:.2g}")
    return 0


def float_source(model: str) -> str:
    """What ``--reference float`` loads for ``model``: a float model is its own reference (loaded in float32);
    a quantized directory names its float model in ``config.json`` (``lowbit_float_model``)."""
    if model == "default" or saved_kind(model) == "float":
        return model
    config = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
    if FLOAT_SOURCE_KEY not in config:
        raise ValueError(f"--reference float: {model!r} does not record its float model ({FLOAT_SOURCE_KEY!r} in "
                         "config.json; `lowbit quantize` writes it); pass the float model's directory or 'default'")
    return config[FLOAT_SOURCE_KEY]


def run_export(model: nn.Module, tokenizer, output: Path, export_format: str, batch: dict[str, torch.Tensor],
               rows: list[dict], overwrite: bool = False) -> int:
    """Export through the registry; formats ``load_quantized`` reads are loaded back and their logits checked
    against the in-memory model (relative Frobenius difference <= EXPORT_RELOAD_RTOL)."""
    path = export(model, output, export_format, tokenizer=tokenizer, overwrite=overwrite)
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
    if args.reference is not None and args.save_reference is not None:
        raise ValueError("pass --reference (score MODEL against a reference) or --save-reference (write MODEL's "
                         "top-k as a reference), not both")
    reference_file = (TopKReference(args.reference) if args.reference and args.reference.endswith(".safetensors")
                      else None)  # opened (and checked) before any model is loaded
    model, tokenizer = load_causal_lm(args.model, dtype=DTYPES[args.dtype], device=args.device)
    text = _texts(args.text, default_eval_text())
    window = {"seq_len": args.seq_len, "stride": stride(args), "max_tokens": args.eval_tokens,
              "progress": not args.no_progress}
    start = time.perf_counter()
    row = {"model": args.model, "kind": "float" if args.model == "default" else saved_kind(args.model)}
    if args.save_reference is not None:
        path = save_topk_reference(model, tokenizer, text, args.save_reference, args.top_k, **window)
        saved = TopKReference(path)
        row.update({"top-k": saved.k, "positions": saved.positions, "file MB": round(saved.nbytes / MEGABYTE, 2)})
    elif args.reference is not None:
        reference = reference_file
        if reference is None:
            source = float_source(args.model) if args.reference == "float" else args.reference
            reference, _ = load_causal_lm(source, dtype=torch.float32, device=args.device)
        scores = divergence(model, reference, tokenizer, text, **window)
        row.update({"KL": round(scores.mean_kl, 5), "KL p99": round(scores.kl_p99, 4),
                    "top-1 %": round(100 * scores.top1, 2), "perplexity": round(scores.perplexity, 3),
                    "d ppl": round(scores.perplexity_delta, 3)})
        if reference_file is not None:
            row.update({"KL tail bound": round(scores.tail_bound, 5), "top-k": scores.top_k,
                        "file MB": round(reference_file.nbytes / MEGABYTE, 2)})
    else:
        row["perplexity"] = round(perplexity(model, tokenizer, text, **window), 3)
    row.update({"bytes in memory MB": round(model_size(model) / MEGABYTE, 2),
                "seconds": round(time.perf_counter() - start, 2)})
    print(format_table([row]))
    if args.save_reference is not None:
        print(f"saved the top-{args.top_k} log-probabilities of {row['positions']} positions to "
              f"{args.save_reference}; score a model against it with --reference {args.save_reference}")
    elif reference_file is not None:
        print(f"KL from the top-{reference_file.k} reference is a lower bound; the full KL lies within "
              f"+{scores.tail_bound:.3g} of it (worst case of the dropped tail)")
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
    parser.add_argument("--output", required=True,
                        help="directory to write (new, empty, or written by lowbit; else add --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output lowbit did not write")
    parser.add_argument("--packed", action="store_true", help="store packed low-bit weights (lowbit.compress)")
    parser.add_argument("--export-format", choices=export_formats(),
                        help="write this export instead of lowbit's own checkpoint (hf: ModelOpt's unified HF "
                             "checkpoint; compressed-tensors: llm-compressor's; see lowbit.export)")
    add_auto_arguments(parser)
    parser.add_argument("--calib-text", help=".txt or .jsonl calibration text (default: the bundled one)")
    parser.add_argument("--calib-samples", type=positive_int, default=128, help="calibration windows (default: 128)")
    parser.add_argument("--eval-text", help=".txt or .jsonl evaluation text (default: the bundled held-out one)")
    parser.set_defaults(handler=lambda args, argv: run_quantize(args))


def add_eval_parser(commands, positive_int) -> None:
    parser = commands.add_parser(
        "eval", help="KL divergence to a reference, perplexity and in-memory size of a model directory",
        description="Score held-out text with a model (against a reference: mean and 99th-percentile KL "
                    "divergence per token, top-1 agreement, perplexity and its change) and report its real size.")
    add_common_arguments(parser, positive_int)
    parser.add_argument("--text", help=".txt or .jsonl text to score (default: the bundled held-out one)")
    parser.add_argument("--reference", metavar="float|SOURCE|FILE.safetensors",
                        help="score against 'float' (the float model MODEL was quantized from), a model SOURCE "
                             "(run beside MODEL), or a top-k file written by --save-reference")
    parser.add_argument("--save-reference", metavar="FILE.safetensors",
                        help="write MODEL's top-k next-token log-probabilities on the text, for --reference")
    parser.add_argument("--top-k", type=positive_int, default=DEFAULT_TOP_K,
                        help=f"log-probabilities kept per position by --save-reference (default: {DEFAULT_TOP_K})")
    parser.set_defaults(handler=lambda args, argv: run_eval(args))
