"""A linear's weight quantizer seen as static scales per group of input columns (GPTQ, AWQ clip).

Supported: a TensorQuantizer with a static amax that is per-tensor, per output channel (``axis=0``)
or per block along the input dim (``block_sizes={-1: g}``), integer (symmetric) or FP8/FP4 elements.
Not supported: dynamic blocks (NVFP4, MX: their block scales come from the data at run time),
asymmetric integers, other axes, SequentialQuantizer.

Shapes, for a weight ``(out, in)`` with ``n = in / g`` groups: the quantizer's amax is ``()``-like
``(1, 1)`` per-tensor, ``(out, 1)`` per-channel, ``(out, n, 1)`` per-group.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.quantizer import TensorQuantizer
from lowbit.structure.weights import QuantizableWeight


def weight_group_size(linear: QuantizableWeight, name: str = "weight_quantizer", per_row: bool = False,
                      asymmetric: bool = False) -> int:
    """Columns sharing one scale (``in_features`` unless block-wise); ValueError if unsupported.

    ``per_row=True`` also rejects a per-tensor amax (the AWQ clip search picks one amax per row);
    ``asymmetric=True`` accepts quantizers calibrated to ``[amin, amax]`` too (asymmetric, signed-scale).
    """
    quantizer = linear.weight_quantizer
    in_features = linear.weight.shape[1]
    if not isinstance(quantizer, TensorQuantizer):
        raise ValueError(f"{name}: {type(quantizer).__name__} is not supported here; use one TensorQuantizer")
    config = quantizer.config
    if config.is_dynamic or config.block_scale_bits is not None or (config.keeps_amin and not asymmetric):
        raise ValueError(
            f"{name}: {config.format_name} {config.granularity} has no static per-group scale; supported are "
            "static symmetric int/fp formats per-tensor, per-channel (axis=0) or with block_sizes={-1: g}"
        )
    if config.block_sizes is not None:
        axes = config.block_axes
        if set(axes) - {-1, 1}:
            raise ValueError(f"{name}: block_sizes={config.block_sizes} must block the input dim only (-1)")
        size = next(iter(axes.values()))
        return in_features if size is None else size
    if config.axis not in (None, 0, (0,), -2, (-2,)) or (per_row and config.axis is None):
        raise ValueError(
            f"{name}: axis={config.axis} is not supported; use axis=0 (per output channel) or block_sizes"
        )
    return in_features


def quantize_with_amax(quantizer: TensorQuantizer, weight: Tensor, amax: Tensor) -> Tensor:
    """Fake-quantize ``weight`` with ``amax`` given in any shape holding the quantizer's amax elements."""
    expected = quantizer.compute_amax(weight).shape
    return quantizer.fake_quant(weight, amax.reshape(expected))


def quantize_column(quantizer: TensorQuantizer, column: Tensor, amax: Tensor) -> Tensor:
    """One weight column ``(out,)`` fake-quantized with its group's ``amax`` (as ``compute_amax`` of the
    group's ``(out, g)`` slab returns it: one value per row, or one for all).

    Uses the quantizer's elementwise rule on a ``(out, 1)`` view (the ``quant_fn`` it hands its
    calibrators), so a block format costs one column, not a zero-padded block.
    """
    return quantizer.fake_quant_view(column[:, None], amax.reshape(-1, 1))[:, 0]


def set_weight_amax(quantizer: TensorQuantizer, weight: Tensor, amax: Tensor) -> None:
    """Store ``amax`` (any shape with the right number of elements) as the quantizer's static amax."""
    quantizer.amax = amax.detach().float().reshape(quantizer.compute_amax(weight).shape).contiguous()


def effective_input(linear: QuantizableWeight, x: Tensor) -> Tensor:
    """What the weight multiplies: ``x`` times the input quantizer's pre_quant_scale, if it has one."""
    scales = [m.pre_quant_scale for m in linear.input_quantizer.modules()
              if isinstance(m, TensorQuantizer) and m.pre_quant_scale is not None]
    return x * scales[0].to(x.dtype) if scales else x


def sample_rows(x: Tensor, count: int) -> Tensor:
    """``count`` rows of ``x.reshape(-1, in)``, evenly spaced (all rows if there are fewer), float32."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] > count:
        rows = rows[torch.linspace(0, rows.shape[0] - 1, count, device=rows.device).round().long()]
    return rows.float()


def shrink_ratios(minimum: float, step: float, minimum_name: str, step_name: str) -> list[float]:
    """``1, 1 - step, 1 - 2 step, ...`` down to ``minimum`` (inclusive, up to float rounding): the shrunk
    ranges a clip or scale search tries. The names are the caller's option names, for the errors."""
    if not 0 < minimum <= 1:
        raise ValueError(f"{minimum_name}={minimum!r} must be in (0, 1]")
    if not 0 < step < 1:
        raise ValueError(f"{step_name}={step!r} must be in (0, 1)")
    count = int(round((1 - minimum) / step + 1e-9))
    return [1 - i * step for i in range(count + 1)]
