"""Per-input-channel scaling shared by SmoothQuant and AWQ: ``y = (x / s) @ (W * s)^T = x @ W^T``.

A *group* is the quantizable weights that read the same input tensor (Llama: q, k, v read
``input_layernorm``'s output; gate, up read ``post_attention_layernorm``'s), found by tracing
(``lowbit.structure.groups``). For a group, ``s`` (per input channel) multiplies every weight's
columns, and ``1/s`` is applied to the input either

- folded into the producing norm (``norm.weight /= s``, ``norm.bias /= s``) when the norm's output goes
  to this group only; the fold is checked on up to ``FOLD_CHECK_ROWS`` rows of the norm's traced input
  (the folded norm's output times ``s`` must match the traced output: relative RMS change < 5%, well
  above bf16 rounding, far below a wrong fold) and undone otherwise, e.g. for norms that compute
  ``x * (1 + weight)``;
- or set as ``input_quantizer.pre_quant_scale = 1/s`` on each linear of the group.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lowbit.algorithms.activation_ranges import InputRanges
from lowbit.algorithms.layerwise import tensor_quantizers
from lowbit.structure.groups import InputGroup

FOLD_TOLERANCE = 0.05


def check_unscaled(group: InputGroup, name_prefix: str = "") -> None:
    """ValueError if a linear of the group already has a pre_quant_scale (a model is smoothed once)."""
    for name, linear in group.linears.items():
        if any(q.pre_quant_scale is not None for q in tensor_quantizers(linear.input_quantizer)):
            raise ValueError(f"{name_prefix}{name}: input_quantizer already has a pre_quant_scale; smooth a model once")


def scale_weights(group: InputGroup, scale: Tensor) -> None:
    """``W[:, j] *= scale[j]`` for every linear of the group (float32 math, stored in the weight's dtype)."""
    with torch.no_grad():
        for linear in group.linears.values():
            linear.weight.copy_(linear.weight.float() * scale.to(linear.weight.device))


def fold_into_norm(norm: nn.Module, scale: Tensor) -> dict[str, Tensor]:
    """``norm.weight /= scale`` and ``norm.bias /= scale`` (where present), float32 math; returns the
    original values for :func:`restore_norm`."""
    originals = {}
    with torch.no_grad():
        for name in ("weight", "bias"):
            parameter = getattr(norm, name, None)
            if isinstance(parameter, Tensor):
                originals[name] = parameter.detach().clone()
                parameter.copy_(parameter.float() / scale.to(parameter.device))
    return originals


def restore_norm(norm: nn.Module, originals: dict[str, Tensor]) -> None:
    """Undo :func:`fold_into_norm` exactly."""
    with torch.no_grad():
        for name, value in originals.items():
            getattr(norm, name).copy_(value)


def set_pre_quant_scale(group: InputGroup, scale: Tensor) -> None:
    """``input_quantizer.pre_quant_scale = 1/scale`` (float32) on every linear of the group."""
    for linear in group.linears.values():
        quantizer = tensor_quantizers(linear.input_quantizer)[0]
        quantizer.pre_quant_scale = (1.0 / scale).float().to(linear.weight.device)


def relative_change(output: Tensor, reference: Tensor) -> float:
    """``||output - reference|| / ||reference||`` in float32 (what FOLD_TOLERANCE bounds)."""
    output, reference = output.float(), reference.float()
    return float((output - reference).norm() / reference.norm().clamp_min(torch.finfo(torch.float32).tiny))


def fold_keeps_output(group: InputGroup, scale: Tensor) -> bool:
    """After ``fold_into_norm(group.norm, scale)``: does the folded norm's output on the traced rows, times
    ``scale``, match the traced output (relative change <= ``FOLD_TOLERANCE``)?"""
    rows_in, rows_out = group.norm_rows
    with torch.no_grad():
        folded = group.norm(rows_in).float() * scale.to(rows_in.device)
    return relative_change(folded, rows_out) <= FOLD_TOLERANCE


def apply_input_scale(group: InputGroup, scale: Tensor, ranges: InputRanges | None = None) -> str:
    """Scale the group's weight columns by ``scale`` and its input by ``1/scale``; returns "folded" or
    "pre_quant_scale" (see the module docstring). The float function is unchanged. ``ranges`` (measured
    input ranges) follow the scaling."""
    check_unscaled(group)
    if ranges is not None:
        ranges.rescale(group.linears.values(), scale)
    scale_weights(group, scale)
    if group.norm is not None:
        originals = fold_into_norm(group.norm, scale)
        if fold_keeps_output(group, scale):
            return "folded"
        restore_norm(group.norm, originals)
    set_pre_quant_scale(group, scale)
    return "pre_quant_scale"
