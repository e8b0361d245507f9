"""Fused MoE experts in compress_weights: each 3-D expert Parameter (``gate_up_proj (E, 2I, H)``,
``down_proj (E, H, I)``, ``lowbit.modules.experts``) takes the primary format, per expert and per group
along its input dim, through the experts' stacked ``ExpertQuantizer`` (one scale per expert, row and
group), and is packed per expert by ``lowbit.compress`` (``lowbit.compress.experts``).

Experts are not ranked by the ratio rule (NNCF has no 3-D weights to rank): they are most of an MoE
model's bytes, and leaving them float would make the compressed model barely smaller. ``ignored_scope``
names them ``{module}.{projection}`` (e.g. ``model.layers.0.mlp.experts.down_proj``). NF4 has no
per-expert quantizer: in that mode the experts stay float with a warning naming them and their bytes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from torch import nn

from lowbit.modules.experts import expert_projections, is_fused_experts


@dataclass(frozen=True, eq=False)
class ExpertsWeight:
    """One fused 3-D expert Parameter: ``name`` is ``{module}.{projection}``; its quantizer slot
    ``{module}.{projection}_weight_quantizer``."""

    name: str
    module_name: str
    module: nn.Module
    projection: str

    @property
    def quantizer_name(self) -> str:
        prefix = f"{self.module_name}." if self.module_name else ""
        return f"{prefix}{self.projection}_weight_quantizer"

    @property
    def parameter(self) -> nn.Parameter:
        return getattr(self.module, self.projection)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(experts, out, in)`` as the quantizer sees each expert (transposed storage undone)."""
        experts, first, second = self.parameter.shape
        return (experts, second, first) if self.module.is_transposed else (experts, first, second)


def find_fused_experts(model: nn.Module) -> list[ExpertsWeight]:
    """Every fused-experts Parameter of ``model``, in module order (float or already quantized modules)."""
    found = []
    for name, module in model.named_modules():
        if is_fused_experts(module):
            prefix = f"{name}." if name else ""
            found += [ExpertsWeight(f"{prefix}{projection}", name, module, projection)
                      for projection in expert_projections(module)]
    return found


def warn_float_experts(experts: list[ExpertsWeight], reason: str) -> None:
    """A UserWarning naming each fused-experts weight left float, with its bytes."""
    if experts:
        listed = ", ".join(f"{w.name} ({w.parameter.numel() * w.parameter.element_size():,d} bytes)" for w in experts)
        warnings.warn(f"fused MoE expert weights stay float ({reason}): {listed}", stacklevel=3)
