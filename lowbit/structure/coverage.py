"""What a quantized model left in float, by kind and by bytes, so that nothing is skipped silently.

Every weight matrix of the model counts once (a tied tensor, like GPT-2's lm_head, under its first
holder): each parameter of two or more dims, a 3-D fused-expert parameter as ``E`` matrices. A matrix
is *quantized* when a weight quantizer of its module sees it (``weights_by_slot``) and is enabled, or
when it is stored packed (``CompressedLinear``, counted at ``PACKED_COUNTED_BYTES`` per weight, its
float size); its *kind* is its record's
(``lowbit.structure.weights``: linear, transposed, conv, experts ...), else the holder's type
(embedding; a 3-D parameter is experts; anything else is other).

A float matrix is *by rule* when it has a disabled weight quantizer (a config rule or the default
disabled it: ``*lm_head*``, routers) or is an embedding (``quantize()`` leaves embeddings to
``compress_weights``); else it had no quantizer at all (no registered kind). :func:`warn_uncovered`
warns when those unruled float bytes exceed ``UNRULED_WARN_SHARE`` of all weight bytes.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass, field

from torch import Tensor, nn

from lowbit.modules.registry import is_quantized
from lowbit.structure.weights import weight_records, weights_by_slot

UNRULED_WARN_SHARE = 0.20
PACKED_COUNTED_BYTES = 2


@dataclass
class KindCoverage:
    """Counts (matrices) and bytes (as stored in memory) of one kind of weight."""

    kind: str
    total: int = 0
    quantized: int = 0
    total_bytes: int = 0
    quantized_bytes: int = 0
    unruled_bytes: int = 0  # float, and no quantizer said so
    unruled_names: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return (f"{self.kind}: {self.quantized} of {self.total} quantized, "
                f"{self.total_bytes - self.quantized_bytes:,d} of {self.total_bytes:,d} bytes left float")


def _is_packed(module: nn.Module) -> bool:
    """A packed linear (``lowbit.compress.CompressedLinear``): a weight format, no float weight."""
    return hasattr(module, "weight_format") and not isinstance(getattr(module, "weight", None), Tensor)


def _holder_kind(module: nn.Module, tensor: Tensor) -> str:
    if isinstance(module, nn.Embedding):
        return "embedding"
    return "experts" if tensor.dim() == 3 else "other"


def weight_coverage(model: nn.Module) -> dict[str, KindCoverage]:
    """{kind: KindCoverage} over every weight matrix of ``model`` (module docstring)."""
    coverage: dict[str, KindCoverage] = defaultdict(lambda: KindCoverage(""))
    seen: set[int] = set()

    def count(kind: str, name: str, tensor: Tensor, quantized: bool, ruled: bool) -> None:
        entry = coverage[kind]
        entry.kind = kind
        matrices = tensor.shape[0] if tensor.dim() == 3 else 1
        size = tensor.numel() * tensor.element_size()
        entry.total += matrices
        entry.total_bytes += size
        if quantized:
            entry.quantized += matrices
            entry.quantized_bytes += size
        elif not ruled:
            entry.unruled_bytes += size
            entry.unruled_names.append(name)

    for name, module in model.named_modules():
        if _is_packed(module):
            entry = coverage["linear"]
            entry.kind = "linear"
            entry.total, entry.quantized = entry.total + 1, entry.quantized + 1
            size = module.in_features * module.out_features * PACKED_COUNTED_BYTES
            entry.total_bytes, entry.quantized_bytes = entry.total_bytes + size, entry.quantized_bytes + size
        slots = weights_by_slot(module) if is_quantized(module) else {}
        records = weight_records(name, module)
        kind = records[0].kind if records else None
        for slot, tensor in slots.items():
            base = tensor._base if tensor._base is not None else tensor
            if id(base) in seen:
                continue
            seen.add(id(base))
            quantizer = getattr(module, slot, None)
            enabled = quantizer is not None and quantizer.is_enabled
            count(kind or _holder_kind(module, tensor), f"{name}.{slot}", tensor, enabled, ruled=quantizer is not None)
        for param_name, parameter in module.named_parameters(recurse=False):
            if parameter.dim() < 2 or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            holder_kind = _holder_kind(module, parameter)
            count(holder_kind, f"{name}.{param_name}" if name else param_name, parameter, False,
                  ruled=holder_kind == "embedding")
    return dict(coverage)


def coverage_summary(coverage: dict[str, KindCoverage]) -> str:
    """One line per kind: ``linear: 12 of 14 quantized, 1,024 of 9,216 bytes left float``."""
    return "\n".join(entry.describe() for entry in coverage.values())


def warn_uncovered(coverage: dict[str, KindCoverage], stacklevel: int = 3) -> float:
    """Warn (UserWarning) when float weights no rule left float exceed ``UNRULED_WARN_SHARE`` of the
    weight bytes; returns that share."""
    total = sum(entry.total_bytes for entry in coverage.values())
    unruled = sum(entry.unruled_bytes for entry in coverage.values())
    share = unruled / total if total else 0.0
    if share > UNRULED_WARN_SHARE:
        names = [name for entry in coverage.values() for name in entry.unruled_names]
        kinds = ", ".join(f"{e.kind} {e.unruled_bytes:,d} bytes" for e in coverage.values() if e.unruled_bytes)
        warnings.warn(
            f"{share:.0%} of the model's weight bytes stay float with no quantizer and no rule saying so "
            f"({kinds}; e.g. {', '.join(names[:4])}): lowbit has no registered kind for them "
            "(lowbit.structure.register_weight_kind); " + "; ".join(e.describe() for e in coverage.values()),
            stacklevel=stacklevel,
        )
    return share
