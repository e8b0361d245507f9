"""Model-level calibration primitives: every quantizer slot, weight calibration, one calibration pass, max.

These sit below both ``lowbit.convert`` (``quantize()`` / ``calibrate()``) and ``lowbit.algorithms`` (which
build on a calibration pass), so imports run one way: convert -> algorithms -> calibration -> quantizer.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn

from lowbit.modules.registry import is_quantized
from lowbit.quantizer import (
    SequentialQuantizer,
    TensorQuantizer,
    collecting_statistics,
    quantization_off,
    reusing_outputs,
)
from lowbit.structure.weights import weights_by_slot

ForwardLoop = Callable[[nn.Module], None]
Quantizer = TensorQuantizer | SequentialQuantizer


def iter_quantizers(model: nn.Module) -> Iterator[tuple[str, Quantizer]]:
    """(full name, quantizer) for every quantizer slot; a SequentialQuantizer counts as one."""
    for name, module in model.named_modules():
        if is_quantized(module):
            for slot in module.quantizer_names:
                yield f"{name}.{slot}" if name else slot, getattr(module, slot)


def calibrate_weights(model: nn.Module) -> None:
    """Static weight scales straight from the weights (no data needed); sequential quantizers chain."""
    for module in model.modules():
        if not is_quantized(module):
            continue
        for slot, weight in weights_by_slot(module).items():
            quantizer = getattr(module, slot, None)
            if quantizer is not None:
                calibrate_weight(quantizer, weight.detach())


def calibrate_weight(quantizer: Quantizer, weight: torch.Tensor) -> None:
    """Static scales of ``quantizer`` from ``weight`` (the tensor it sees); sequential stages chain."""
    stages = list(quantizer) if isinstance(quantizer, SequentialQuantizer) else [quantizer]
    with torch.no_grad():
        for index, stage in enumerate(stages):
            if stage.is_enabled and not stage.config.is_dynamic:
                with collecting_statistics([stage], across_ranks=False):  # the same weight on every rank
                    stage(weight)
            if index + 1 < len(stages):  # the next stage calibrates on this one's output
                weight = stage(weight)


def static_activation_quantizers(model: nn.Module) -> list[TensorQuantizer]:
    """Every enabled static quantizer (sequential stages included) that is not a weight quantizer."""
    found = []
    for name, quantizer in iter_quantizers(model):
        if name.endswith("weight_quantizer"):
            continue
        stages = list(quantizer) if isinstance(quantizer, SequentialQuantizer) else [quantizer]
        found += [s for s in stages if s.is_enabled and not s.config.is_dynamic]
    return found


def calibration_pass(model: nn.Module, forward_loop: ForwardLoop, quantizers: list[TensorQuantizer],
                     float_model: bool = False) -> None:
    """One run of ``forward_loop`` (eval mode, no_grad) with ``quantizers`` collecting statistics (and not
    quantizing); their ``amax`` is loaded at the end.

    The other quantizers work as at inference; each weight is fake-quantized once for the whole pass, not
    per batch (weight quantizers reuse their output: one extra copy of the weights in memory while the
    pass runs). With ``float_model`` every quantizer passes its input through instead (ModelOpt's
    calibration; SmoothQuant's, which rescales the weights after the pass).
    """
    every = [q for _, q in iter_quantizers(model)]
    weights = [q for name, q in iter_quantizers(model) if name.endswith("weight_quantizer")]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), quantization_off(every if float_model else []), \
                reusing_outputs([] if float_model else weights), collecting_statistics(quantizers):
            forward_loop(model)
    finally:
        model.train(was_training)


def max_calibrate(model: nn.Module, forward_loop: ForwardLoop | None) -> None:
    """Weights from themselves; activations from their calibrators while ``forward_loop`` runs through the
    model with quantized weights (:func:`calibration_pass`)."""
    calibrate_weights(model)
    activations = static_activation_quantizers(model)
    if not activations:
        return
    if forward_loop is None:
        raise ValueError("forward_loop is None, but activation quantizers need calibration data")
    calibration_pass(model, forward_loop, activations)
    missing = [q for q in activations if q.amax is None]
    if missing:
        warnings.warn(
            f"{len(missing)} activation quantizer(s) saw no data during calibration (e.g. MoE experts no "
            "token reached); they quantize dynamically from each input",
            stacklevel=2,
        )
