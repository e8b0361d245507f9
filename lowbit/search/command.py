"""``lowbit quantize MODEL --auto-quantize-bits 4.8 --quant nvfp4,fp8 --output DIR``: auto_quantize from the CLI.

The calibration batches serve both steps (every batch calibrates each format, every batch scores);
``forward_step`` runs the causal LM with ``labels=input_ids`` and the loss is its mean next-token NLL.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from lowbit.search.auto import auto_quantize
from lowbit.search.candidates import search_formats
from lowbit.search.scores import METHODS


def add_auto_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--auto-quantize-bits", type=float, metavar="BITS",
                        help="choose a format per layer group (lowbit.auto_quantize) so that the weights average "
                             "BITS effective bits, scales included; needs --quant, replaces --preset/--config")
    parser.add_argument("--quant", metavar="FMT,FMT",
                        help="formats to choose among with --auto-quantize-bits, e.g. nvfp4,fp8 or "
                             "INT4_AWQ_CFG,FP8_DEFAULT_CFG (not quantizing is always a choice)")
    parser.add_argument("--auto-quantize-method", choices=METHODS, default="gradient",
                        help="sensitivity score: gradient (Fisher, needs backprop) or kl_div (default: gradient)")
    parser.add_argument("--search-state", metavar="FILE.json", help="write the search state (scores, choices) here")


def auto_formats(args: argparse.Namespace) -> list[str] | None:
    """The validated --quant formats when --auto-quantize-bits is given (None otherwise); errors name the flag."""
    if args.auto_quantize_bits is None:
        if args.quant is not None or args.search_state is not None:
            raise ValueError("--quant and --search-state go with --auto-quantize-bits BITS")
        return None
    if args.preset is not None or args.config is not None:
        raise ValueError("--auto-quantize-bits chooses the formats itself: pass --quant FMT,FMT instead of "
                         "--preset/--config")
    if not args.quant:
        raise ValueError("--auto-quantize-bits needs --quant FMT,FMT (e.g. --quant nvfp4,fp8)")
    names = [name.strip() for name in args.quant.split(",") if name.strip()]
    try:
        search_formats(names)
    except (TypeError, ValueError) as error:
        raise ValueError(f"--quant {args.quant!r}: {error}") from None
    return names


def run_auto_quantize(model: nn.Module, batches: list[dict[str, torch.Tensor]], formats: list[str],
                      args: argparse.Namespace) -> str:
    """auto_quantize ``model`` in place on ``batches``; prints the achieved bits, returns a row label."""
    device = next(model.parameters()).device

    def forward_step(m: nn.Module, batch: dict[str, torch.Tensor]):
        inputs = {name: tensor.to(device) for name, tensor in batch.items()}
        return m(**inputs, labels=inputs["input_ids"])

    _, state = auto_quantize(model, {"effective_bits": args.auto_quantize_bits}, formats, batches, forward_step,
                             lambda output, batch: output.loss, method=args.auto_quantize_method,
                             num_calib_steps=len(batches), num_score_steps=len(batches))
    chosen = {choice: sum(g.choice == choice for g in state.groups) for choice in state.choices}
    print(f"auto_quantize: {state.effective_bits:.3f} effective bits (budget {args.auto_quantize_bits}); layer "
          f"groups per choice: {chosen}")
    if args.search_state is not None:
        state.save(args.search_state)
    return f"auto {args.auto_quantize_bits} bits"
