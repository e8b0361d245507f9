"""The model-structure layer every algorithm goes through: repeated blocks (``blocks``), the quantizable
weights inside them of every registered kind (``weights``), and the groups of weights reading one input,
found by tracing (``groups``). Fused MoE experts register their weight kind in ``experts``."""

from lowbit.structure import experts  # noqa: F401  (registers the fused-experts weight kind)
from lowbit.structure.weights import (
    QuantizableWeight,
    quantizable_weights,
    register_weight_kind,
    weights_by_slot,
)

__all__ = ["QuantizableWeight", "quantizable_weights", "register_weight_kind", "weights_by_slot"]
