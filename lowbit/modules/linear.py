"""Quantized Linear and Hugging Face GPT-2 Conv1D: ``out = output_q(x_q @ w_q^T + b)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.modules.registry import QuantModuleMixin, register


class QuantLinear(QuantModuleMixin, nn.Linear):
    """nn.Linear with input, weight and output quantizers; weight ``(out, in)``, axis 0 = output channel."""

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = F.linear(self.input_quantizer(input), self.quantized_weight(), self.bias)
        return self.output_quantizer(out)


def _register_hf_conv1d() -> None:
    from transformers.pytorch_utils import Conv1D

    class QuantConv1D(QuantModuleMixin, Conv1D):
        """GPT-2's Conv1D stores the weight ``(in, out)``; its quantizer sees ``weight.T`` so that axis 0
        is the output channel and ``block_sizes={-1: g}`` groups the input dim, as for nn.Linear."""

        def weight_slots(self) -> dict[str, torch.Tensor]:
            return {"weight_quantizer": self.weight.t()}

        def quantized_weight(self) -> torch.Tensor:
            return self.weight_quantizer(self.weight.t()).t()

        def forward(self, input: torch.Tensor) -> torch.Tensor:
            x = self.input_quantizer(input)
            out = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.quantized_weight())
            return self.output_quantizer(out.view(*x.shape[:-1], self.nf))

    register(original_cls=Conv1D, quantized_cls=QuantConv1D)


def _register_hf_linear_subclasses() -> None:
    """transformers' nn.Linear subclasses whose forward is ``x @ W^T + b`` (the registry matches exact
    classes, so each is named here): Falcon's ``FalconLinear``."""
    from transformers.models.falcon.modeling_falcon import FalconLinear

    register(original_cls=FalconLinear,
             quantized_cls=type("QuantFalconLinear", (QuantLinear, FalconLinear), {"__module__": __name__}))


register(original_cls=nn.Linear, quantized_cls=QuantLinear)
_register_hf_conv1d()
_register_hf_linear_subclasses()
