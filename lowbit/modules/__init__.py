"""Quantized module classes and the registry that maps original classes to them."""

from lowbit.modules import conv, linear  # noqa: F401  (registers the built-in classes)
from lowbit.modules.attention import register_hf_attention
from lowbit.modules.conv import (
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    QuantConvTranspose1d,
    QuantConvTranspose2d,
    QuantConvTranspose3d,
)
from lowbit.modules.experts import register_fused_experts
from lowbit.modules.linear import QuantLinear
from lowbit.modules.registry import (
    QUANT_MODULE_REGISTRY,
    QuantModuleMixin,
    convert_module,
    is_quantized,
    register,
    register_class_finder,
    revert_module,
    unregister,
)

register_class_finder(register_hf_attention)  # Hugging Face attention classes, on first sight
register_class_finder(register_fused_experts)  # fused 3-D MoE experts, on first sight

__all__ = [
    "QUANT_MODULE_REGISTRY", "QuantConv1d", "QuantConv2d", "QuantConv3d", "QuantConvTranspose1d",
    "QuantConvTranspose2d", "QuantConvTranspose3d", "QuantLinear", "QuantModuleMixin", "convert_module",
    "is_quantized", "register", "register_class_finder", "revert_module", "unregister",
]
