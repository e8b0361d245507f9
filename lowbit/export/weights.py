"""A quantized layer's weight as the exporters write it: lowbit's own codes and step sizes, unpacked.

Every exporter starts from ``quantized_weight(name, module)``, which packs the weight through
``lowbit.compress`` (so the codes are exactly those of the fake-quantized weight) and unpacks it into

    x_hat = (codes - zero_point) * step          (N, K) = (codes - zp)[n, k] * step[n, k // group]

- ``codes``: float32 (N, K) integer values (signed for symmetric INT, 0..2**b-1 for unsigned and
  asymmetric INT) or the FP8 element values;
- ``step``: float32 (N, K // group): ``1 / scale`` for lowbit's symmetric INT and FP formats (whose
  fake quantization divides, ``codes / scale``; the product differs from it by float32 rounding only),
  the step itself for asymmetric INT;
- ``zero_point``: float32 (N, K // group) or None.

Linear weights are (out, in); a convolution's (out, in, *kernel) is flattened to (out, in * prod(kernel))
and may only be quantized per tensor or per output channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowbit.compress.convert import linear_weight, pack_module_weight
from lowbit.compress.packed import PackedWeight, WeightFormat, quantize_weight
from lowbit.modules import is_quantized
from lowbit.quantizer import SequentialQuantizer, TensorQuantizer

ACTIVATION_QUANTIZERS = ("input_quantizer", "output_quantizer")


@dataclass(frozen=True)
class QuantizedWeight:
    """One weight's codes, steps and zero points (module docstring), with its packed source."""

    name: str
    packed: PackedWeight
    codes: torch.Tensor
    step: torch.Tensor
    zero_point: torch.Tensor | None

    @property
    def format(self) -> WeightFormat:
        return self.packed.format

    @property
    def group_size(self) -> int:
        """How many consecutive K elements of a row share one step."""
        return self.codes.shape[1] // self.step.shape[1]

    def steps_per(self, group: int) -> torch.Tensor:
        """``step`` repeated so that one entry covers ``group`` elements: (N, K // group)."""
        return _repeat_groups(self.step, self.group_size, group, self.name)

    def zero_points_per(self, group: int) -> torch.Tensor | None:
        """``zero_point`` repeated like ``steps_per``, or None."""
        if self.zero_point is None:
            return None
        return _repeat_groups(self.zero_point, self.group_size, group, self.name)


def _repeat_groups(values: torch.Tensor, have: int, want: int, name: str) -> torch.Tensor:
    """Per-``have`` entries as per-``want`` entries; ``want`` must divide ``have`` (or the row)."""
    if have % want:
        raise ValueError(f"layer {name!r}: its scales cover groups of {have} elements, which cannot be "
                         f"written as groups of {want}")
    return values.repeat_interleave(have // want, dim=1)


def weight_quantizer(name: str, module: nn.Module) -> TensorQuantizer | None:
    """The enabled weight quantizer of a quantized module, None when it has none or it is disabled.

    A SequentialQuantizer (W4A8's two stages) is refused: no export target here holds two weight grids."""
    if not is_quantized(module):
        return None
    quantizer = getattr(module, "weight_quantizer", None)
    if isinstance(quantizer, SequentialQuantizer):
        if quantizer.is_enabled:
            raise ValueError(f"layer {name!r}: a sequential weight quantizer (several grids in a row) cannot be "
                             "exported to this target")
        return None
    if not isinstance(quantizer, TensorQuantizer) or not quantizer.is_enabled:
        return None
    return quantizer


def active_activation_quantizers(module: nn.Module) -> list[tuple[str, TensorQuantizer]]:
    """The module's enabled input / output quantizers (or any with a pre_quant_scale, which always applies)."""
    found = []
    for attribute in ACTIVATION_QUANTIZERS:
        quantizer = getattr(module, attribute, None)
        if isinstance(quantizer, SequentialQuantizer) or (
            isinstance(quantizer, TensorQuantizer) and (quantizer.is_enabled or quantizer.pre_quant_scale is not None)
        ):
            found.append((attribute, quantizer))
    return found


def quantized_weight(name: str, module: nn.Module) -> QuantizedWeight:
    """The codes and steps of ``module``'s weight (module docstring); ValueError naming the layer if
    lowbit cannot pack its format."""
    try:
        packed = _pack(module)
    except ValueError as error:
        raise ValueError(f"layer {name!r}: {error}") from error
    fmt = packed.format
    if fmt.kind in ("nvfp4", "mx"):
        raise ValueError(f"layer {name!r}: {fmt.kind} weights have two-level scales; this target holds one "
                         "scale per group")
    if fmt.packs_nibbles:
        codes = packed.element_values()
    elif fmt.kind == "float":
        codes = packed.codes.float()
    else:
        codes = packed.codes.float() - fmt.code_offset
    scale = packed.scale.float()
    codes_per_row = codes.shape[1]
    if scale.shape[1] == 1 and codes_per_row > 1:  # per tensor / per channel: one group spans the row
        scale = scale.expand(codes.shape[0], 1)
    if fmt.kind == "int_asym":
        step, zero_point = scale, packed.zero_point.float().expand_as(scale)
    else:
        step, zero_point = 1.0 / scale, None
    return QuantizedWeight(name, packed, codes, step.contiguous(), zero_point)


def _pack(module: nn.Module) -> PackedWeight:
    if linear_weight(module) is not None:
        return pack_module_weight(module)
    quantizer = module.weight_quantizer
    weight = module.weight.detach()
    if quantizer.config.block_sizes is not None or quantizer.config.axis not in (None, 0, (0,)):
        raise ValueError(f"{type(module).__name__} weight {tuple(weight.shape)} quantized with "
                         f"{quantizer.config.granularity}: only per-tensor or per-output-channel (axis=0) "
                         "convolution weights are exported")
    if quantizer.pre_quant_scale is not None:
        raise ValueError("a convolution weight with a pre_quant_scale cannot be exported")
    flat = weight.reshape(weight.shape[0], -1)
    fmt = WeightFormat.from_config(quantizer.config, tuple(flat.shape))
    amax = None if quantizer.amax is None else quantizer.amax.detach().reshape(-1, 1)
    amin = None if quantizer.amin is None else quantizer.amin.detach().reshape(-1, 1)
    return quantize_weight(flat, fmt, amax=amax, amin=amin)
