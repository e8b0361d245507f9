"""compress(model): replace every fake-quantized Linear by a CompressedLinear over packed storage.

Validation comes first: every module to compress gets its storage format before any is replaced, so
an unsupported quantizer leaves the model untouched. Each weight is packed from the quantizer's own
calibrated statistics through lowbit.formats, so the compressed module multiplies exactly the
fake-quantized weight (``CompressedLinear.dequantized_weight() == weight_quantizer(weight)``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowbit.compress.experts import CompressedExpertsMixin, check_experts_format, compress_experts, compressible_experts
from lowbit.compress.linear import CompressedLinear
from lowbit.compress.packed import SCALE_DTYPES, PackedWeight, WeightFormat, quantize_weight
from lowbit.modules import is_quantized
from lowbit.modules.low_rank import LowRankQuantLinear
from lowbit.quantizer import TensorQuantizer
from lowbit.structure.weights import is_hf_conv1d, weights_by_slot


def linear_weight(module: nn.Module) -> torch.Tensor | None:
    """The (out, in) weight of a quantized Linear (GPT-2 Conv1D stores it transposed), else None."""
    if is_quantized(module) and (isinstance(module, nn.Linear) or is_hf_conv1d(module)):
        return weights_by_slot(module)["weight_quantizer"]
    return None


def pack_module_weight(module: nn.Module, scale_dtype: torch.dtype = torch.float32) -> PackedWeight:
    """Pack a quantized Linear's weight with its weight quantizer's format and statistics."""
    quantizer = module.weight_quantizer
    weight = linear_weight(module).detach()
    fmt = WeightFormat.from_config(quantizer.config, tuple(weight.shape))
    if quantizer.pre_quant_scale is not None:  # the quantizer quantizes weight * pre_quant_scale
        weight = weight * quantizer.pre_quant_scale.to(weight.dtype)
    amax = None if quantizer.amax is None else quantizer.amax.detach()
    amin = None if quantizer.amin is None else quantizer.amin.detach()
    return quantize_weight(weight, fmt, amax=amax, amin=amin, scale_dtype=scale_dtype,
                           block_amax=quantizer.block_amax)


def compressible_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every quantized Linear whose weight quantizer is an enabled TensorQuantizer."""
    found = []
    for name, module in model.named_modules():
        if not is_quantized(module) or linear_weight(module) is None:
            continue
        quantizer = module.weight_quantizer
        if isinstance(quantizer, TensorQuantizer) and quantizer.is_enabled:
            found.append((name, module))
    return found


def compress(model: nn.Module, scale_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace each quantized Linear whose weight quantizer is enabled by a ``CompressedLinear``.

    Formats: INT2-8 (symmetric, unsigned, asymmetric) per tensor / per channel / blocks along the input
    dim, FP8 E4M3/E5M2 and FP4 E2M1 with float scales, NVFP4, MXFP4/MXFP8. ``scale_dtype`` stores INT
    and float scales in float32 (bit-exact, the default) or float16/bfloat16 (smaller, rounded scale).
    Fused MoE experts are packed per expert (``lowbit.compress.experts``), in place.
    Layers with a disabled or sequential (W4A8) weight quantizer keep fake quantization. Returns the
    model (the new module when ``model`` itself is a quantized Linear). Raises ValueError, before
    changing anything, when no layer can be compressed or a format is unsupported.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype={scale_dtype}: allowed are {list(SCALE_DTYPES)}")
    targets = compressible_linears(model)
    experts = [(name, m) for name, m in model.named_modules() if compressible_experts(m)]
    if not targets and not experts:
        raise ValueError("model has no quantized Linear with an enabled weight quantizer: call lowbit.quantize first")
    for name, module in targets:
        try:
            WeightFormat.from_config(module.weight_quantizer.config, tuple(linear_weight(module).shape))
        except ValueError as error:
            raise ValueError(f"{name or type(module).__name__}.weight_quantizer: {error}") from None
    for name, module in experts:
        try:
            check_experts_format(module)
        except ValueError as error:
            raise ValueError(f"{name or type(module).__name__} (fused experts): {error}") from None
    for _, module in experts:  # in place: the module keeps its name and place
        compress_experts(module, scale_dtype)
    for name, module in targets:
        compressed = CompressedLinear.from_packed(
            pack_module_weight(module, scale_dtype), module.bias, module.input_quantizer, module.output_quantizer,
            dtype=linear_weight(module).dtype,
        )
        if isinstance(module, LowRankQuantLinear):  # the float branch: LoRA adapters, the same formula
            compressed.add_lora(module.lora_a.shape[0])
            compressed.lora_a, compressed.lora_b = module.lora_a, module.lora_b
            compressed.lora_scale = module.lora_scale
        if not name:
            return compressed
        model.set_submodule(name, compressed)
    return model


def compressed_weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the packed weights, bytes the same weights take in bfloat16) over all CompressedLinears and
    compressed fused experts."""
    packed = dense = 0
    for module in model.modules():
        if isinstance(module, CompressedLinear):
            packed += module.packed.nbytes
            dense += module.in_features * module.out_features * 2
        elif isinstance(module, CompressedExpertsMixin):
            for projection in module.projections:
                packed += module.packed_experts(projection).nbytes
                dense += math.prod(module.expert_shapes[projection]) * 2
    return packed, dense
