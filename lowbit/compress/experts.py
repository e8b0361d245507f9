"""Packed storage for fused MoE experts: each expert's ``(out, in)`` weight packed as a Linear's
(``lowbit.compress.packed``, same formats and layouts), the E experts' tensors stacked on a leading axis.

Buffers per projection ``p`` (``gate_up_proj`` / ``up_proj``, ``down_proj``), shapes of one expert's
``PackedWeight`` tensors with ``E`` in front: ``{p}_codes``, ``{p}_scale`` and, by format,
``{p}_zero_point`` and ``{p}_global_scale`` (NVFP4: ``(E,)``, one global scale per expert).

``compress`` turns a fake-quantized experts module into a compressed one in place: its class becomes
``Compressed<Experts>`` (the original class plus the routed loop of ``lowbit.modules.experts``), the 3-D
Parameters are replaced by the buffers, the per-expert input quantizers stay. Expert ``e``'s projection
is ``kernels.weight_only_linear(input_q(x, e), packed_e, bias_e)``, the same kernel CompressedLinear uses,
on a weight equal bit for bit to the fake-quantized one, so outputs equal fake quantization's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowbit.compress.packed import TENSOR_NAMES, PackedWeight, WeightFormat, quantize_weight, storage_spec
from lowbit.expert_quantizer import ExpertQuantizer, per_expert, quantize_expert_input
from lowbit.kernels import weight_only_linear
from lowbit.modules.experts import QuantExpertsMixin, RoutedExpertsMixin
from lowbit.modules.registry import revert_module


@dataclass(frozen=True)
class PackedExperts:
    """E experts' packed ``(out, in)`` weights: ``tensors`` hold each PackedWeight tensor stacked on dim 0."""

    format: WeightFormat
    shape: tuple[int, int, int]  # (E, out, in)
    tensors: dict[str, torch.Tensor]

    def expert(self, index: int) -> PackedWeight:
        empty = dict.fromkeys(TENSOR_NAMES)
        return PackedWeight(self.format, self.shape[1:], **{**empty, **{n: t[index] for n, t in self.tensors.items()}})

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def expert_format(quantizer: ExpertQuantizer, weight: torch.Tensor) -> WeightFormat:
    """Storage format of a stacked ``(E, out, in)`` weight; ValueError if ``compress`` cannot pack it."""
    return WeightFormat.from_config(quantizer.config, tuple(weight.shape[1:]))


def pack_experts(weight: torch.Tensor, quantizer: ExpertQuantizer,
                 scale_dtype: torch.dtype = torch.float32) -> PackedExperts:
    """Pack each expert ``weight[e]`` (times ``pre_quant_scale[e]``) with ``amax[e]`` / ``amin[e]``."""
    fmt = expert_format(quantizer, weight)
    packed = []
    for expert in range(weight.shape[0]):
        w = weight[expert].detach()
        if quantizer.pre_quant_scale is not None:
            w = w * quantizer.pre_quant_scale[expert].to(w.dtype)
        amax = None if quantizer.amax is None else quantizer.amax[expert].detach()
        amin = None if quantizer.amin is None else quantizer.amin[expert].detach()
        searched = None if quantizer.block_amax is None else quantizer.block_amax[expert].detach()
        packed.append(quantize_weight(w, fmt, amax=amax, amin=amin, scale_dtype=scale_dtype, block_amax=searched))
    tensors = {name: torch.stack([p.tensors()[name] for p in packed]) for name in packed[0].tensors()}
    return PackedExperts(fmt, tuple(weight.shape), tensors)


class CompressedExpertsMixin(RoutedExpertsMixin):
    """The routed loop over packed experts (see the module docstring)."""

    expert_formats: dict[str, WeightFormat]
    expert_shapes: dict[str, tuple[int, int, int]]
    expert_scale_dtype: torch.dtype

    def packed_experts(self, projection: str) -> PackedExperts:
        prefix = f"{projection}_"
        tensors = {name: getattr(self, prefix + name) for name in TENSOR_NAMES if hasattr(self, prefix + name)}
        return PackedExperts(self.expert_formats[projection], self.expert_shapes[projection], tensors)

    def dequantized_expert_weight(self, projection: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(E, out, in)`` weight the packed storage holds (what fake quantization multiplied)."""
        packed = self.packed_experts(projection)
        return torch.stack([packed.expert(e).dequantize(dtype) for e in range(packed.shape[0])])

    def _weights(self) -> dict:
        return {projection: self.packed_experts(projection) for projection in self.projections}

    def _linear(self, projection: str, expert: int, x: torch.Tensor, weights: dict) -> torch.Tensor:
        x = quantize_expert_input(getattr(self, f"{projection}_input_quantizer"), x, expert)
        return weight_only_linear(x, weights[projection].expert(expert), self._bias(projection, expert))


_COMPRESSED_CLASSES: dict[type, type] = {}


def _compressed_class(original: type[nn.Module]) -> type[nn.Module]:
    if original not in _COMPRESSED_CLASSES:
        _COMPRESSED_CLASSES[original] = type(f"Compressed{original.__name__}", (CompressedExpertsMixin, original),
                                             {"__module__": __name__})
    return _COMPRESSED_CLASSES[original]


def compressible_experts(module: nn.Module) -> bool:
    """A fake-quantized experts module whose weight quantizers are enabled single-stage ExpertQuantizers."""
    if not isinstance(module, QuantExpertsMixin):
        return False
    quantizers = [getattr(module, f"{p}_weight_quantizer") for p in module.projections]
    return all(isinstance(q, ExpertQuantizer) and q.is_enabled for q in quantizers)


def check_experts_format(module: QuantExpertsMixin) -> None:
    """ValueError (from ``WeightFormat``) if a weight quantizer's format has no packed storage."""
    for projection in module.projections:
        expert_format(getattr(module, f"{projection}_weight_quantizer"), module.expert_weight(projection))


def compress_experts(module: QuantExpertsMixin, scale_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Pack ``module``'s expert weights and make it a ``Compressed<Experts>`` (in place; returns it)."""
    packed = {p: pack_experts(module.expert_weight(p), getattr(module, f"{p}_weight_quantizer"), scale_dtype)
              for p in module.projections}
    inputs = {p: getattr(module, f"{p}_input_quantizer") for p in module.projections}
    original = type(module).original_class
    revert_module(module)
    install_packed_experts(module, original, packed, inputs, scale_dtype)
    return module


def install_packed_experts(module: nn.Module, original: type[nn.Module], packed: dict[str, PackedExperts],
                           input_quantizers: dict[str, nn.Module], scale_dtype: torch.dtype) -> None:
    """Make an original-class experts ``module`` the compressed one over ``packed`` {projection: storage}."""
    _become_compressed(module, original, tuple(packed), {p: (pk.format, pk.shape) for p, pk in packed.items()},
                       scale_dtype)
    for projection, packed_experts in packed.items():
        for name, tensor in packed_experts.tensors.items():
            setattr(module, f"{projection}_{name}", tensor)
    for projection, quantizer in input_quantizers.items():
        setattr(module, f"{projection}_input_quantizer", per_expert(quantizer, module.num_experts))


def _become_compressed(module: nn.Module, original: type[nn.Module], projections: tuple[str, str],
                       formats: dict[str, tuple[WeightFormat, tuple[int, int, int]]],
                       scale_dtype: torch.dtype = torch.float32) -> None:
    """Drop the 3-D Parameters, swap the class, register meta buffers of the storage shapes."""
    for projection in projections:
        delattr(module, projection)
    module.__class__ = _compressed_class(original)
    module.projections = projections
    module.expert_formats = {p: fmt for p, (fmt, _) in formats.items()}
    module.expert_shapes = {p: shape for p, (_, shape) in formats.items()}
    module.expert_scale_dtype = scale_dtype
    for projection, (fmt, shape) in formats.items():
        for name, (storage_shape, dtype) in storage_spec(fmt, shape[1:], scale_dtype).items():
            module.register_buffer(f"{projection}_{name}", torch.empty((shape[0], *storage_shape), dtype=dtype,
                                                                       device="meta"))


def describe_experts(module: CompressedExpertsMixin) -> dict:
    """JSON-ready description for ``save_compressed`` (``rebuild_experts`` reads it back)."""
    from lowbit.checkpoint import quantizer_state

    return {
        "projections": list(module.projections),
        "formats": {p: module.expert_formats[p].to_dict() for p in module.projections},
        "shapes": {p: list(module.expert_shapes[p]) for p in module.projections},
        "scale_dtype": str(module.expert_scale_dtype).removeprefix("torch."),
        "quantizers": {f"{p}_input_quantizer": quantizer_state(getattr(module, f"{p}_input_quantizer"))
                       for p in module.projections},
    }


def rebuild_experts(module: nn.Module, entry: dict) -> None:
    """Turn a fresh (original-class) experts module into the compressed one ``entry`` describes, with meta
    buffers for ``load_state_dict(assign=True)``."""
    from lowbit.checkpoint import load_quantizer

    projections = tuple(entry["projections"])
    formats = {p: (WeightFormat.from_dict(entry["formats"][p]), tuple(entry["shapes"][p])) for p in projections}
    _become_compressed(module, type(module), projections, formats, getattr(torch, entry["scale_dtype"]))
    for slot, saved in entry["quantizers"].items():
        setattr(module, slot, per_expert(load_quantizer(saved), module.num_experts))
