"""Quantized convolutions (1/2/3-D, plain and transposed), weight quantized as stored.

Conv weights are ``(out, in/groups, *kernel)`` so ``axis=0`` is per output channel; transposed
convolutions store ``(in, out/groups, *kernel)``, so their output channel is ``axis=1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.modules.registry import QuantModuleMixin, register


class _QuantConvMixin(QuantModuleMixin):
    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = self._conv_forward(self.input_quantizer(input), self.quantized_weight(), self.bias)
        return self.output_quantizer(out)


_TRANSPOSED = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class _QuantConvTransposeMixin(QuantModuleMixin):
    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight)

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        spatial_dims = len(self.kernel_size)
        output_padding = self._output_padding(
            input, output_size, self.stride, self.padding, self.kernel_size, spatial_dims, self.dilation
        )
        out = _TRANSPOSED[spatial_dims](
            self.input_quantizer(input), self.quantized_weight(), self.bias, self.stride, self.padding,
            output_padding, self.groups, self.dilation,
        )
        return self.output_quantizer(out)


def _quantized(original: type[nn.Module], mixin: type) -> type[nn.Module]:
    cls = type(f"Quant{original.__name__}", (mixin, original), {"__module__": __name__})
    register(original_cls=original, quantized_cls=cls)
    return cls


QuantConv1d = _quantized(nn.Conv1d, _QuantConvMixin)
QuantConv2d = _quantized(nn.Conv2d, _QuantConvMixin)
QuantConv3d = _quantized(nn.Conv3d, _QuantConvMixin)
QuantConvTranspose1d = _quantized(nn.ConvTranspose1d, _QuantConvTransposeMixin)
QuantConvTranspose2d = _quantized(nn.ConvTranspose2d, _QuantConvTransposeMixin)
QuantConvTranspose3d = _quantized(nn.ConvTranspose3d, _QuantConvTransposeMixin)
