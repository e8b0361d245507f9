"""Quantized module classes and the registry that maps original classes to them."""

from lowbit.modules import attention, conv, experts, linear  # noqa: F401  (registers the built-in classes)
from lowbit.modules.conv import (
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    QuantConvTranspose1d,
    QuantConvTranspose2d,
    QuantConvTranspose3d,
)
from lowbit.modules.linear import QuantLinear
from lowbit.modules.registry import (
    QUANT_MODULE_REGISTRY,
    QuantModuleMixin,
    convert_module,
    is_quantized,
    register,
    revert_module,
    unregister,
)

__all__ = [
    "QUANT_MODULE_REGISTRY", "QuantConv1d", "QuantConv2d", "QuantConv3d", "QuantConvTranspose1d",
    "QuantConvTranspose2d", "QuantConvTranspose3d", "QuantLinear", "QuantModuleMixin", "convert_module",
    "is_quantized", "register", "revert_module", "unregister",
]
