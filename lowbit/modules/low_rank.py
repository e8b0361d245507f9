"""A quantized Linear with a low-rank float branch on its unquantized input (SVDQuant; LoRA correction)::

    out = output_quantizer(input_quantizer(x) @ weight_quantizer(W)^T + b + lora_scale * (x @ A^T) @ B^T)

``lora_a`` A ``(r, in)`` and ``lora_b`` B ``(out, r)`` are parameters in the weight's dtype, never quantized; the
branch reads the raw input ``x`` (no input quantizer, no ``pre_quant_scale``). Names and formula are those of
``CompressedLinear``'s LoRA adapters, so ``compress`` carries the branch over unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.modules.linear import QuantLinear


class LowRankQuantLinear(QuantLinear):
    """``QuantLinear`` plus the branch of the module docstring (made by :func:`add_low_rank`)."""

    lora_a: nn.Parameter
    lora_b: nn.Parameter
    lora_scale: float

    def low_rank(self, input: Tensor) -> Tensor:
        """``lora_scale * (x @ A^T) @ B^T`` ``(..., out)``."""
        return (input @ self.lora_a.t().to(input.dtype)) @ self.lora_b.t().to(input.dtype) * self.lora_scale

    def forward(self, input: Tensor) -> Tensor:
        out = F.linear(self.input_quantizer(input), self.quantized_weight(), self.bias)
        return self.output_quantizer(out + self.low_rank(input))


def add_low_rank(module: nn.Module, a: Tensor, b: Tensor, scale: float = 1.0, name: str = "module") -> None:
    """Give the quantized Linear ``module`` the branch ``scale * (x @ a^T) @ b^T`` (``a`` ``(r, in)``, ``b``
    ``(out, r)``, stored in the weight's dtype and device), in place: its class becomes
    :class:`LowRankQuantLinear` (parameters, quantizers and hooks stay). A module that already has a branch
    gets the new one added to it (the ranks concatenate). ValueError naming ``name`` for other modules or shapes."""
    if type(module) not in (QuantLinear, LowRankQuantLinear):
        raise ValueError(f"{name}: a low-rank branch needs a quantized nn.Linear (QuantLinear), got "
                         f"{type(module).__name__}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != module.in_features or b.shape != (module.out_features, a.shape[0]):
        raise ValueError(f"{name}: low-rank factors a {tuple(a.shape)}, b {tuple(b.shape)} do not fit a weight "
                         f"({module.out_features}, {module.in_features}): expected (r, in) and (out, r)")
    like = module.weight
    a, b = a.detach().to(like.device, like.dtype), b.detach().to(like.device, like.dtype)
    if isinstance(module, LowRankQuantLinear):  # the sum of two branches: [s1 B1, s2 B2] [A1; A2]
        a = torch.cat([module.lora_a.detach(), a])
        b = torch.cat([module.lora_b.detach() * module.lora_scale, b * scale], dim=1)
        scale = 1.0
    module.__class__ = LowRankQuantLinear
    module.lora_a = nn.Parameter(a.contiguous())
    module.lora_b = nn.Parameter(b.contiguous())
    module.lora_scale = float(scale)
