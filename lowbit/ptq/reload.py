"""Loading an export back and checking it holds the in-memory quantized model.

Comparing logits with every quantizer on is not a sharp test: the export stores divisor scales (amax / maxbound)
that reload as reciprocals, so weights agree to one float32 rounding, and static FP8 / INT8 activation
quantization turns such ulp differences into whole-step flips that cascade over depth (measured on the bundled
model, fp8, 4 x 64 calibration tokens: a 3.6e-7 difference at layer 0's o_proj input grows to 3 % of the
logits). So the check has two exact parts:

- logits with the activation and KV quantizers passing through on both models (weights as stored; the
  ``pre_quant_scale`` still applied): relative Frobenius difference within ``WEIGHT_LOGITS_RTOL``;
- every static activation / KV quantizer's ``amax``, by name, within ``AMAX_RTOL`` (relative).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lowbit.convert import iter_quantizers
from lowbit.export import load_quantized
from lowbit.hf import load_causal_lm
from lowbit.ptq.qformats import LOWBIT_EXPORT
from lowbit.quantizer import SequentialQuantizer, quantization_off

WEIGHT_LOGITS_RTOL = 1e-4
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
    """``||logits(other) - logits(model)|| / ||logits(model)||`` (Frobenius) on the batch's first row;
    inf when ``other``'s logits are not finite."""
    device = next(model.parameters()).device
    inputs = {name: tensor[:1].to(device) for name, tensor in batch.items()}
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


def check_reload(model: nn.Module, reloaded: nn.Module, batch: dict[str, torch.Tensor]) -> dict:
    """{weight_logits_difference, amax_difference} (module docstring); RuntimeError naming what strays."""
    expected = activation_quantizers(model)
    modules = dict(reloaded.named_modules())  # a CompressedLinear's quantizers are modules under the same names
    found = {name: modules[name] for name in expected if name in modules and modules[name].is_enabled}
    missing = sorted(set(expected) - set(found))
    if missing:
        raise RuntimeError(f"the reloaded export lacks {len(missing)} activation / KV quantizer(s), e.g. {missing[0]}")
    worst = 0.0
    for name, quantizer in expected.items():
        for mine, theirs in zip(_static_amaxes(quantizer), _static_amaxes(found[name]), strict=False):
            if (mine is None) != (theirs is None):
                raise RuntimeError(f"{name}: static amax {'lost' if theirs is None else 'gained'} in the export")
            if mine is not None:
                difference = ((theirs.float().to(mine.device) - mine.float()).abs() / mine.float().abs()).max().item()
                worst = max(worst, difference)
                if not difference <= AMAX_RTOL:
                    raise RuntimeError(f"{name}: amax reloads {difference:.3g} (relative) away (allowed {AMAX_RTOL})")
    with quantization_off(list(expected.values())), quantization_off(list(found.values())):
        logits = relative_difference(model, reloaded, batch)
    if not logits <= WEIGHT_LOGITS_RTOL:
        raise RuntimeError(f"the reloaded export's weights give logits {logits:.3g} (relative, activation and KV "
                           "quantizers passing through) away from the in-memory model's "
                           f"(allowed {WEIGHT_LOGITS_RTOL})")
    return {"weight_logits_difference": logits, "amax_difference": worst,
            "logits_difference": relative_difference(model, reloaded, batch)}
