"""Fused MoE experts (``lowbit.modules.experts``) as the structure layer's weights: one record per
(projection, expert), its ``(out, in)`` matrix a view of the fused 3-D Parameter, its quantizers the per-expert
views of the stacked quantizers, its inputs the tokens routed to that expert."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lowbit.modules.experts import QuantExpertsMixin
from lowbit.quantizer import SequentialQuantizer
from lowbit.structure.weights import QuantizableWeight, register_weight_kind


def _expert_view(quantizer, expert: int):
    if isinstance(quantizer, SequentialQuantizer):
        return SequentialQuantizer(*(stage.expert(expert) for stage in quantizer))
    return quantizer.expert(expert)


class ExpertWeight(QuantizableWeight):
    """One expert's projection as a record of a quantizable weight: ``key = (projection, expert)``, ``weight``
    the ``(out, in)`` view of the fused Parameter (``copy_`` writes it), the quantizers the per-expert views
    (``ExpertQuantizer.expert``), inputs the tokens routed to that expert."""

    kind = "experts"

    @property
    def weight(self) -> torch.Tensor:
        projection, expert = self.key
        return self.module.expert_weight(projection)[expert]

    @property
    def weight_quantizer(self) -> nn.Module:
        projection, expert = self.key
        return _expert_view(getattr(self.module, f"{projection}_weight_quantizer"), expert)

    @property
    def input_quantizer(self) -> nn.Module:
        projection, expert = self.key
        return _expert_view(getattr(self.module, f"{projection}_input_quantizer"), expert)

    def observe_inputs(self, callback: Callable[[torch.Tensor], None]) -> RemovableHandle:
        """``callback(x)`` with the tokens routed to this expert's projection, raw, on every forward."""
        def observer(projection: str, expert: int, x: torch.Tensor) -> None:
            if (projection, expert) == self.key:
                callback(x)

        return self.module.add_input_observer(observer)


def expert_weights(name: str, module: QuantExpertsMixin) -> list[ExpertWeight]:
    """The records of a quantized experts module: one per (projection, expert), named ``{name}.{projection}.{e}``;
    registered below as the weight kind of every quantized experts module."""
    prefix = f"{name}." if name else ""
    return [ExpertWeight(f"{prefix}{projection}.{expert}", module, (projection, expert))
            for projection in module.projections for expert in range(module.num_experts)]


register_weight_kind(lambda m: isinstance(m, QuantExpertsMixin), expert_weights)
