"""Carry out a CompressionPlan with lowbit's own machinery, so that fake quantization, packing and
export share one formula per format:

1. ``lowbit.quantize`` with one rule per layer (a filter function on the weight quantizer's exact
   name -> that layer's ``LayerFormat.attributes``; every other quantizer disabled), no calibration;
2. NF4 layers need no step of their own: their attributes round to the NF4 codebook (``lowbit.formats.nf4``);
3. ``lowbit.calibrate(model, "max")``: each weight's scales from the weight alone (integer modes: min/max;
   others: max |w|), then the 4-bit integer modes' range search (``range_search``);
4. data-aware refinements, by lowbit's calibration algorithms (``lowbit.algorithms.registry``), on the
   primary layers only (the others' weight quantizers are switched off meanwhile), in NNCF's order
   AWQ, scale estimation, GPTQ:
   ``awq`` -> ``awq_lite`` (per-channel scales); ``scale_estimation`` -> ``scale_estimation`` (per-group
   grid fitted to the layer output) for the integer modes INT4_SYM / INT4_ASYM, chained after AWQ or
   run by GPTQ first (which keeps that grid); for NF4 / FP4 (not integer grids) -> ``awq_clip``
   (per-group clip search against the layer output, ``awq_full`` with ``awq``); ``gptq`` -> ``gptq``.
   Layer-wise algorithms start from max calibration, so the 4-bit range search runs again when
   AWQ alone was the last step. Scale estimation and GPTQ see consecutive batch-1 items stacked into
   batches of up to ``STACKED_BATCH`` (``data.stacked_items``): their statistics are sums over token
   rows, so only float rounding changes, and a batched layer call is much cheaper than 8 single ones.
   The AWQ methods get the items as given: they sample input rows evenly spaced within each call;
5. :func:`pack`: ``lowbit.compress.compress`` stores the compressed Linear layers packed, with float16
   scales as NNCF stores them (its ``CompressedLinear`` multiplies the dequantized weight). Layers it
   has no format or module for stay fake-quantized: NF4, embeddings, convolutions, and a Linear whose
   weight is tied to another layer's (packing it would untie a copy).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lowbit.convert import calibrate, quantize
from lowbit.modules import is_quantized, revert_module
from lowbit.weight_compression.data import forward_loop, stacked_items
from lowbit.weight_compression.layers import MATMUL, embeddings_registered
from lowbit.weight_compression.plan import SCALE_ESTIMATION_MODES, CompressionPlan, LayerPlan
from lowbit.weight_compression.range_search import search_range


class QuantizerNamed:
    """A quant_cfg key matching one quantizer by its exact full name."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, quantizer_name: str) -> bool:
        return quantizer_name == self.name

    def __repr__(self) -> str:
        return f"QuantizerNamed({self.name!r})"


def _weight_quantizer_name(layer_name: str) -> str:
    return f"{layer_name}.weight_quantizer" if layer_name else "weight_quantizer"


def quantize_config(plan: CompressionPlan) -> dict:
    """The ``lowbit.quantize`` config of ``plan``: one exact-name rule per compressed layer, no algorithm."""
    quant_cfg: dict[Any, dict] = {"default": {"enable": False}}
    for entry in plan.layers:
        if entry.format is not None:
            attributes = entry.format.attributes()
            quant_cfg[QuantizerNamed(_weight_quantizer_name(entry.layer.name))] = attributes.to_dict()
    for weights in plan.experts:
        quant_cfg[QuantizerNamed(weights.quantizer_name)] = plan.options.primary_format.attributes().to_dict()
    return {"quant_cfg": quant_cfg, "algorithm": None}


Refinement = tuple[str, dict]  # (lowbit.calibrate algorithm, its options)
STACKED_BATCH = 8  # items per stacked batch for the methods whose statistics are per token row
ROW_SUM_METHODS = ("scale_estimation", "gptq")  # the awq_* methods sample rows per call: not stacked


def refinements(plan: CompressionPlan) -> list[Refinement]:
    """The ``lowbit.calibrate`` steps the plan's data-aware options ask for, in order (module docstring)."""
    options = plan.options
    integer = options.mode in SCALE_ESTIMATION_MODES
    estimation = options.scale_estimation and integer
    clip = options.scale_estimation and not integer
    steps: list[Refinement] = []
    if options.awq:
        chained = {"scale_estimation": True} if estimation and not options.gptq else {}
        steps.append(("awq_full" if clip else "awq_lite", chained))
    elif clip:
        steps.append(("awq_clip", {}))
    elif estimation and not options.gptq:
        steps.append(("scale_estimation", {}))
    if options.gptq:
        steps.append(("gptq", {"scale_estimation": True} if estimation else {}))
    return steps


def search_ranges(plan: CompressionPlan) -> None:
    """The data-free range search on every layer in a 4-bit integer format (``range_search``)."""
    for entry in plan.layers:
        if entry.format is not None and entry.format.range_objective is not None:
            search_range(entry.layer.module.weight_quantizer, entry.layer.matrix(), entry.format.range_objective)


@contextmanager
def weight_quantizers_disabled(entries: list[LayerPlan]) -> Iterator[None]:
    """Switch off the weight quantizers of ``entries`` for the duration."""
    quantizers = [entry.layer.module.weight_quantizer for entry in entries]
    for quantizer in quantizers:
        quantizer.disable()
    try:
        yield
    finally:
        for quantizer in quantizers:
            quantizer.enable()


def is_packable(entry: LayerPlan) -> bool:
    """A compressed, untied Linear (or GPT-2 Conv1D) in a format ``lowbit.compress`` stores (not NF4)."""
    return (entry.format is not None and not entry.format.is_nf4 and entry.layer.kind == MATMUL
            and entry.layer.tied_to is None)


def pack(model: nn.Module, plan: CompressionPlan) -> nn.Module:
    """Packed storage for the plan's packable layers (module docstring, step 5); returns the model."""
    from lowbit.compress import compress

    compressed = [entry for entry in plan.layers if entry.format is not None]
    if not plan.experts and not any(is_packable(entry) for entry in compressed):
        return model
    with weight_quantizers_disabled([entry for entry in compressed if not is_packable(entry)]):
        return compress(model, scale_dtype=torch.float16)


def apply_plan(model: nn.Module, plan: CompressionPlan, dataset: list | None = None, packed: bool = True) -> nn.Module:
    """Compress ``model``'s weights in place as ``plan`` says (see the module docstring); returns the model.

    ``dataset`` (a list of model inputs) is needed when the plan's options ask for a refinement.
    ``packed=False`` stops before step 5 (every layer fake-quantized). If a step before packing fails,
    the modules converted here get their original classes back and the error propagates (weights a
    refinement already changed stay changed).
    """
    steps = refinements(plan)
    if steps and not dataset:
        raise ValueError(f"refinements {[method for method, _ in steps]} need dataset=<a list of model inputs>")
    already_quantized = {id(module) for module in model.modules() if is_quantized(module)}
    with embeddings_registered():
        quantize(model, quantize_config(plan))
    try:
        calibrate(model, "max")
        search_ranges(plan)
        if steps:
            loops = {False: forward_loop(dataset), True: forward_loop(stacked_items(dataset, STACKED_BATCH))}
            others = [entry for entry in plan.layers if entry.format is not None and not entry.primary]
            with weight_quantizers_disabled(others):
                for method, options in steps:
                    calibrate(model, method, loops[method in ROW_SUM_METHODS], **options)
            if steps[-1] == ("awq_lite", {}):  # its weights were recalibrated to min/max: search again
                search_ranges(plan)
    except BaseException:
        converted = [m for m in model.modules() if is_quantized(m) and id(m) not in already_quantized]
        for module in converted:
            revert_module(module)
        raise
    return pack(model, plan) if packed else model
