"""Loading an export back and checking it holds the in-memory quantized model.

Comparing logits with every quantizer on is not a sharp test: the export stores divisor scales (amax / maxbound)
that reload as reciprocals, so weights agree to one float32 rounding, and static FP8 / INT8 activation
quantization turns such ulp differences into whole-step flips that cascade over depth (measured on the bundled
model, fp8, 4 x 64 calibration tokens: a 3.6e-7 difference at layer 0's o_proj input grows to 3 % of the
logits). So the check compares what the export stores, by name:

- every quantized weight as the model computes with it (``weight_quantizer(weight)``, or a packed layer's
  ``dequantized_weight()``): relative Frobenius difference within ``WEIGHT_RTOL``;
- every enabled activation / KV quantizer's static ``amax`` and ``pre_quant_scale``: within ``AMAX_RTOL``.

The logits difference with everything on (first row, last position: ``relative_difference``) is recorded beside them
(and must be finite).
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import torch
from torch import nn

from lowbit.convert import iter_quantizers
from lowbit.export import load_quantized
from lowbit.hf import load_causal_lm
from lowbit.ptq.qformats import LOWBIT_EXPORT
from lowbit.quantizer import SequentialQuantizer

WEIGHT_RTOL = 1e-5
AMAX_RTOL = 1e-6


def reload_export(path: Path, export_format: str, device: str, dtype: torch.dtype) -> nn.Module | None:
    """The export loaded by lowbit: hf / compressed-tensors by ``load_quantized``, lowbit's checkpoint by
    ``load_causal_lm``; None for gguf / onnx (read by llama.cpp / onnxruntime, not by lowbit)."""
    if export_format == LOWBIT_EXPORT:
        return load_causal_lm(path, dtype=dtype, device=device)[0]
    if export_format in ("hf", "compressed-tensors"):
        return load_quantized(path, dtype=dtype, device=device)
    return None


def relative_difference(model: nn.Module, other: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """``||logits(other) - logits(model)|| / ||logits(model)||`` (Frobenius) on the batch's first row, at its last
    position where the model's forward takes ``logits_to_keep`` (transformers' causal LMs): every weight still takes
    part (attention carries every position into the last; the LM head's whole matrix makes its logits), and the
    LM head's (tokens, vocab) product, the larger part of a small model's forward, is made once instead of per
    token. Inf when ``other``'s logits are not finite."""
    device = next(model.parameters()).device
    inputs = {name: tensor[:1].to(device) for name, tensor in batch.items()}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        inputs["logits_to_keep"] = 1
    with torch.no_grad():
        expected = model(**inputs).logits.float()
        actual = other(**inputs).logits.float().to(device)
    if not torch.isfinite(actual).all():
        return float("inf")
    return ((actual - expected).norm() / expected.norm()).item()


def activation_quantizers(model: nn.Module) -> dict[str, nn.Module]:
    """{name: quantizer} of every enabled quantizer that is not a weight quantizer (inputs, outputs, KV)."""
    return {name: q for name, q in iter_quantizers(model) if not name.endswith("weight_quantizer") and q.is_enabled}


def _static_amaxes(quantizer: nn.Module) -> list[torch.Tensor | None]:
    stages = list(quantizer) if isinstance(quantizer, SequentialQuantizer) else [quantizer]
    return [stage.amax for stage in stages]


def effective_weight(module: nn.Module) -> torch.Tensor | None:
    """The weight a layer computes with, in float32 before any rounding to the model's dtype: packed layers
    dequantized, fake-quantized ones through their quantizer on the float32 weight. (A bf16 model's quantizer
    rounds its output to bf16, 2^-9 relative, which would hide a wrong code under ``WEIGHT_RTOL`` if compared
    there; the codes and scales are the same either way.)"""
    if hasattr(module, "dequantized_weight"):
        return module.dequantized_weight(torch.float32)
    quantizer, weight = getattr(module, "weight_quantizer", None), getattr(module, "weight", None)
    if quantizer is None or not isinstance(weight, torch.Tensor):
        return None
    with torch.no_grad():
        return quantizer(weight.float()) if quantizer.is_enabled else weight.float()


def _relative(mine: torch.Tensor, theirs: torch.Tensor) -> float:
    mine, theirs = mine.float(), theirs.float().to(mine.device)
    return ((theirs - mine).norm() / mine.norm().clamp_min(1e-30)).item()


def _stored_as_computed(module: nn.Module) -> bool:
    """A reloaded layer whose weight is the quantized weight itself, stored dense in the model's dtype (no packed
    codes, no enabled weight quantizer): the in-memory side is compared after the same rounding to that dtype,
    which is the weight a model of that dtype computes with."""
    quantizer = getattr(module, "weight_quantizer", None)
    return not hasattr(module, "dequantized_weight") and not (quantizer is not None and quantizer.is_enabled)


def _weights_difference(model: nn.Module, reloaded: nn.Module) -> float:
    modules = dict(reloaded.named_modules())
    worst = 0.0
    for name, module in model.named_modules():
        quantizer = getattr(module, "weight_quantizer", None)
        if not (hasattr(module, "dequantized_weight") or (quantizer is not None and quantizer.is_enabled)):
            continue
        theirs = effective_weight(modules[name]) if name in modules else None
        if theirs is None:
            raise RuntimeError(f"{name}: the reloaded export has no weight for this quantized layer")
        mine = effective_weight(module)
        if _stored_as_computed(modules[name]):  # e.g. W4A8's chain, written dense in the model's dtype
            mine = mine.to(modules[name].weight.dtype)
        difference = _relative(mine, theirs)
        if not difference <= WEIGHT_RTOL:
            raise RuntimeError(f"{name}: the reloaded weight is {difference:.3g} (relative) away "
                               f"(allowed {WEIGHT_RTOL})")
        worst = max(worst, difference)
    return worst


def check_reload(model: nn.Module, reloaded: nn.Module, batch: dict[str, torch.Tensor]) -> dict:
    """{weights_difference, amax_difference, logits_difference} (module docstring); RuntimeError naming what
    strays."""
    expected = activation_quantizers(model)
    modules = dict(reloaded.named_modules())  # a CompressedLinear's quantizers are modules under the same names
    found = {name: modules[name] for name in expected if name in modules and modules[name].is_enabled}
    missing = sorted(set(expected) - set(found))
    if missing:
        raise RuntimeError(f"the reloaded export lacks {len(missing)} activation / KV quantizer(s), e.g. {missing[0]}")
    worst = 0.0
    for name, quantizer in expected.items():
        pairs = list(zip(_static_amaxes(quantizer), _static_amaxes(found[name]), strict=False))
        pairs.append((getattr(quantizer, "pre_quant_scale", None), getattr(found[name], "pre_quant_scale", None)))
        for mine, theirs in pairs:
            if (mine is None) != (theirs is None):
                raise RuntimeError(f"{name}: a static scale is {'lost' if theirs is None else 'gained'} in the export")
            if mine is not None:
                difference = ((theirs.float().to(mine.device) - mine.float()).abs() / mine.float().abs()).max().item()
                worst = max(worst, difference)
                if not difference <= AMAX_RTOL:
                    raise RuntimeError(f"{name}: amax reloads {difference:.3g} (relative) away (allowed {AMAX_RTOL})")
    logits = relative_difference(model, reloaded, batch)
    if not math.isfinite(logits):
        raise RuntimeError("the reloaded export gives non-finite logits")
    return {"weights_difference": _weights_difference(model, reloaded), "amax_difference": worst,
            "logits_difference": logits}
