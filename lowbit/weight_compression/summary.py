"""The summary of a weight-compression plan: each layer's format and bits, and the model's size.

Sizes are computed, not measured: a compressed weight takes ``LayerFormat.storage_bits`` (codes plus
per-group fp16 scales and zero points, rounded up to bytes per layer); everything else (float layers,
norms, biases, buffers) keeps ``numel * element_size`` of the float model (:func:`tensor_bytes`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from lowbit.eval.table import format_table

FLOAT = "float"


@dataclass(frozen=True)
class LayerSummary:
    """One layer: ``format`` is a LayerFormat label, or "float" when the weight is kept."""

    name: str
    kind: str
    shape: tuple[int, int]
    num_weights: int
    format: str
    ratio_defining: bool
    original_bytes: int
    compressed_bytes: int
    tied_to: str | None = None

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight, scales and zero points included."""
        return 8 * self.compressed_bytes / self.num_weights


@dataclass(frozen=True)
class CompressionSummary:
    """Per-layer formats and the model size before (``original_bytes``) and after (``compressed_bytes``)."""

    layers: tuple[LayerSummary, ...]
    model_bytes: int  # the float model, every parameter and buffer

    @property
    def original_bytes(self) -> int:
        return self.model_bytes

    @property
    def compressed_bytes(self) -> int:
        saved = sum(layer.original_bytes - layer.compressed_bytes for layer in self._owned())
        return self.model_bytes - saved

    def _owned(self) -> list[LayerSummary]:
        return [layer for layer in self.layers if layer.tied_to is None]

    def distribution(self) -> list[dict]:
        """NNCF's table: for each format, its share of all compressible weights and of the ratio-defining ones."""
        owned = self._owned()
        total = sum(layer.num_weights for layer in owned) or 1
        defining_total = sum(layer.num_weights for layer in owned if layer.ratio_defining) or 1
        rows = []
        for label in sorted({layer.format for layer in owned}, reverse=True):
            of_format = [layer for layer in owned if layer.format == label]
            defining = [layer for layer in of_format if layer.ratio_defining]
            rows.append({
                "format": label,
                "% all weights (layers)": _share(of_format, total),
                "% ratio-defining weights (layers)": _share(defining, defining_total),
            })
        return rows

    def table(self) -> str:
        """The distribution, every layer's format and bits per weight, and the sizes, as text."""
        per_layer = [
            {
                "layer": layer.name,
                "shape": "x".join(map(str, layer.shape)),
                "weights": layer.num_weights,
                "format": layer.format if layer.tied_to is None else f"tied to {layer.tied_to}",
                "bits/weight": round(layer.bits_per_weight, 3),
                "ratio-defining": "yes" if layer.ratio_defining else "",
            }
            for layer in self.layers
        ]
        ratio = self.original_bytes / max(self.compressed_bytes, 1)
        sizes = (f"model size: {self.original_bytes / 2**20:.3f} MiB -> {self.compressed_bytes / 2**20:.3f} MiB "
                 f"({ratio:.2f}x smaller)")
        return "\n\n".join([format_table(self.distribution()), format_table(per_layer), sizes])

    def __str__(self) -> str:
        return self.table()


def _share(layers: list[LayerSummary], total: int) -> str:
    weights = sum(layer.num_weights for layer in layers)
    return f"{100 * weights / total:.0f}% ({len(layers)})"


def tensor_bytes(model: nn.Module) -> int:
    """``numel * element_size`` summed over ``model``'s parameters and buffers (shared ones once)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def layer_bytes(num_bits: int) -> int:
    """Whole bytes holding ``num_bits`` bits."""
    return math.ceil(num_bits / 8)
