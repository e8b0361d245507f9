"""The ``lowbit`` command line.

    lowbit demo [--presets FP8_DEFAULT,INT4_BLOCKWISE_WEIGHT_ONLY] [--eval-tokens 8192]
                [--calib-samples 32] [--threads N] [--json rows.json] [--no-progress]
    lowbit quantize MODEL --preset NAME --output DIR [--packed | --export-format FORMAT] [--algorithm NAME]
                                                                                     (lowbit.commands)
    lowbit eval MODEL [--text FILE] [--eval-tokens N]                                (lowbit.commands)
    lowbit ptq --model PATH --qformat FORMAT --export-path DIR [--dry-run] ...        (lowbit.ptq.cli)

``demo`` loads the bundled default model on CPU, calibrates each preset on the bundled calibration
text, and prints, on held-out text, the mean per-token KL divergence to the float model and the top-1
agreement with it (``lowbit.eval.divergence``), perplexity and its change, the packed weight size and the
quantization time.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch
from torch import nn

from lowbit.attributes import QuantizerAttributeConfig
from lowbit.calibration import iter_quantizers
from lowbit.commands import add_eval_parser, add_quantize_parser
from lowbit.convert import fold_weight, quantize
from lowbit.eval import Divergence, format_table
from lowbit.presets import get_preset
from lowbit.ptq.cli import add_ptq_parser
from lowbit.quantizer import SequentialQuantizer
from lowbit.report import (
    SEQ_LEN,
    Measurement,
    Workload,
    available_cpus,
    measure,
    measure_baseline,
    packed_weight_bytes,
    run_context,
)

DEMO_PRESETS = (  # a few minutes on a 2-core CPU; --presets takes any of lowbit.PRESETS
    "FP8_DEFAULT_CFG",
    "INT8_DEFAULT_CFG",
    "INT4_BLOCKWISE_WEIGHT_ONLY_CFG",
    "NVFP4_DEFAULT_CFG",
    "W4A16_NVFP4_CFG",
)
DEMO_EVAL_TOKENS = 8192
DEMO_CALIB_SAMPLES = 32
MEGABYTE = 1e6


def preset_names(text: str) -> list[str]:
    """Comma-separated preset names, validated and normalized (``fp8_default`` -> ``FP8_DEFAULT_CFG``).

    Raises ValueError naming the unknown preset and listing the allowed ones.
    """
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError(f"--presets={text!r}: name at least one preset")
    normalized = []
    for name in names:
        get_preset(name)  # raises with the allowed names
        key = name.upper()
        normalized.append(key if key.endswith("_CFG") else key + "_CFG")
    return normalized


def quantized_formats(model: nn.Module) -> tuple[str, str]:
    """(weight format, activation format) of the first enabled weight / input quantizers, '-' if none."""
    found = {"weight_quantizer": "-", "input_quantizer": "-"}
    for name, quantizer in iter_quantizers(model):
        slot = name.rsplit(".", 1)[-1]
        if slot in found and found[slot] == "-" and quantizer.is_enabled:
            stages = list(quantizer) if isinstance(quantizer, SequentialQuantizer) else [quantizer]
            found[slot] = "+".join(_short_format(stage.config) for stage in stages if stage.is_enabled)
    return found["weight_quantizer"], found["input_quantizer"]


def _short_format(config: QuantizerAttributeConfig) -> str:
    if config.block_scale_bits is not None:
        return config.format_name
    if config.block_sizes is not None:
        sizes = list(config.block_axes.values())
        return f"{config.format_name}/g{sizes[0]}" if len(sizes) == 1 and sizes[0] else config.format_name
    return f"{config.format_name}/{'tensor' if config.axis is None else 'channel'}"


def measure_preset(workload: Workload, name: str) -> tuple[Measurement, tuple[str, str]]:
    """Quantize a copy of the workload's model with preset ``name``; returns its measurement and formats.

    The size is read from the quantizers first; then the fake-quantized weights are folded into the
    model (``fold_weight``: same outputs, no weight quantization on every forward) for evaluation.
    """
    formats = ["-", "-"]

    def apply(model: nn.Module) -> nn.Module:
        quantized = quantize(model, get_preset(name), workload.forward_loop())
        formats[:] = quantized_formats(quantized)
        return quantized

    def folded_divergence(model: nn.Module) -> Divergence:
        return workload.divergence(fold_weight(model))

    result = measure("lowbit", name, workload.model, apply, folded_divergence, packed_weight_bytes)
    return result, (formats[0], formats[1])


def demo_rows(workload: Workload, presets: Sequence[str]) -> list[dict]:
    """One row per preset plus the original model's first: the numbers ``lowbit demo`` prints."""
    baseline = measure_baseline(workload)
    rows = [_demo_row(baseline, baseline, ("bf16", "fp32"))]
    for name in presets:
        result, formats = measure_preset(workload, name)
        rows.append(_demo_row(result, baseline, formats))
    return rows


def _demo_row(result: Measurement, baseline: Measurement, formats: tuple[str, str]) -> dict:
    row = result.as_row(baseline)
    return {
        "format": row["config"].removesuffix("_CFG"),
        "weights": formats[0],
        "activations": formats[1],
        "kl": row["kl"],
        "kl_p99": row["kl_p99"],
        "top1": row["top1"],
        "perplexity": row["perplexity"],
        "delta": row["delta"],
        "delta_pct": row["delta_pct"],
        "weight_bytes": row["weight_bytes"],
        "compression": baseline.weight_bytes / row["weight_bytes"] if row["weight_bytes"] else None,
        "seconds": row["seconds"],
        "cpu_seconds": row["cpu_seconds"],
        "error": row["error"],
    }


def format_demo_table(rows: list[dict]) -> str:
    """The demo rows as an aligned text table (rounded for reading; the JSON keeps full precision)."""
    def rounded(value, digits):
        return None if value is None else round(value, digits)

    shown = [
        {
            "format": row["format"],
            "weights": row["weights"],
            "acts": row["activations"],
            "KL": rounded(row["kl"], 5),
            "top-1 %": rounded(None if row["top1"] is None else 100 * row["top1"], 2),
            "ppl": rounded(row["perplexity"], 3),
            "d ppl": rounded(row["delta"], 3),
            "d %": rounded(row["delta_pct"], 2),
            "weights MB": rounded(None if row["weight_bytes"] is None else row["weight_bytes"] / MEGABYTE, 2),
            "x smaller": rounded(row["compression"], 2),
            "quant s": rounded(row["seconds"], 2),
            "cpu s": rounded(row["cpu_seconds"], 2),
            **({"error": row["error"]} if any(r["error"] for r in rows) else {}),
        }
        for row in rows
    ]
    return format_table(shown)


def demo(args: argparse.Namespace, argv: Sequence[str]) -> int:
    torch.set_num_threads(args.threads)
    workload = Workload.default(args.calib_samples, args.eval_tokens, progress=not args.no_progress)
    rows = demo_rows(workload, args.presets)
    print(format_demo_table(rows))
    if args.json is not None:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({**run_context(["lowbit", *argv]), "rows": rows}, handle, indent=1)
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _presets(text: str) -> list[str]:
    try:
        return preset_names(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowbit", description="Post-training quantization for PyTorch models.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser(
        "demo", help="quantize the bundled model with several presets and compare KL divergence and perplexity",
        description="Quantize the bundled default model with several presets on CPU and print, on held-out text, "
                    "the mean KL divergence to the float model, top-1 agreement, perplexity and its change, "
                    "packed weight size and calibration+quantization time.",
    )
    demo_parser.add_argument("--presets", type=_presets, default=list(DEMO_PRESETS),
                             help=f"comma-separated preset names (default: {','.join(DEMO_PRESETS)})")
    demo_parser.add_argument("--eval-tokens", type=_positive_int, default=DEMO_EVAL_TOKENS,
                             help=f"held-out tokens scored (default: {DEMO_EVAL_TOKENS})")
    demo_parser.add_argument("--calib-samples", type=_positive_int, default=DEMO_CALIB_SAMPLES,
                             help=f"calibration windows of {SEQ_LEN} tokens (default: {DEMO_CALIB_SAMPLES})")
    demo_parser.add_argument("--threads", type=_positive_int, default=available_cpus(),
                             help="torch CPU threads (default: the CPUs available)")
    demo_parser.add_argument("--json", metavar="PATH", help="also write the rows (full precision) as JSON")
    demo_parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    demo_parser.set_defaults(handler=demo)
    add_quantize_parser(commands, _positive_int)
    add_eval_parser(commands, _positive_int)
    add_ptq_parser(commands, _positive_int)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args, argv)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as error:
        parser.exit(2, f"lowbit {args.command}: error: {error}\n")
