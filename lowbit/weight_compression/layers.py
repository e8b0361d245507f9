"""The layers whose weights compress_weights compresses, and which of them set the primary/backup ratio.

Compressible: ``nn.Linear`` and Hugging Face ``Conv1D`` (matmuls), ``nn.Embedding``, ``nn.Conv1d/2d/3d``,
in ``model.named_modules()`` order, each weight once (a weight tied to an earlier layer's, like a tied
``lm_head``, is skipped). As in NNCF, the *ratio-defining* layers are the matmuls without the last one
(the output head); ``all_layers=True`` adds the last matmul and the embeddings. Convolutions and, unless
``all_layers``, embeddings and the last matmul always get the backup mode. When the last matmul is
skipped (ignored or tied), no other matmul takes its place.

Embeddings have no quantized class in ``lowbit.modules``; :class:`QuantEmbedding` is registered only
while compress_weights runs (:func:`embeddings_registered`), so presets never see embeddings.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.modules import QuantModuleMixin, register, unregister
from lowbit.modules.registry import QUANT_MODULE_REGISTRY, is_quantized, quantized_class_for
from lowbit.structure.weights import is_hf_conv1d, weights_by_slot

MATMUL, EMBEDDING, CONVOLUTION = "matmul", "embedding", "convolution"
IgnoredScope = Iterable[str] | Callable[[str], bool] | None


class QuantEmbedding(QuantModuleMixin, nn.Embedding):
    """nn.Embedding with a weight quantizer; the weight ``(num_embeddings, dim)`` has rows as channels."""

    quantizer_names = ("weight_quantizer",)

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.embedding(input, self.quantized_weight(), self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)


@contextmanager
def embeddings_registered() -> Iterator[None]:
    """Register QuantEmbedding for nn.Embedding for the duration (unless a class is registered already)."""
    if nn.Embedding in QUANT_MODULE_REGISTRY:
        yield
        return
    register(original_cls=nn.Embedding, quantized_cls=QuantEmbedding)
    try:
        yield
    finally:
        unregister(nn.Embedding)


def _kind(module: nn.Module) -> str | None:
    """The layer kind of a module lowbit can quantize (exact classes, as the registry matches them)."""
    original = type(module).original_class if is_quantized(module) else type(module)
    if original is nn.Embedding:
        return EMBEDDING
    if not (is_quantized(module) or quantized_class_for(module) is not None):
        return None
    if issubclass(original, nn.Linear) or is_hf_conv1d(module):
        return MATMUL
    if original in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        return CONVOLUTION
    return None


@dataclass(frozen=True, eq=False)
class WeightLayer:
    """A module whose weight compress_weights compresses; ``shape`` is ``(out, in)`` as the quantizer sees it.

    ``tied_to`` names the earlier layer that owns the same weight tensor: this layer takes that layer's
    format and counts neither in the ratio nor in the size.
    """

    name: str
    module: nn.Module
    kind: str
    tied_to: str | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self._seen_by_quantizer().flatten(1).shape)

    @property
    def num_weights(self) -> int:
        return self.module.weight.numel()

    def matrix(self) -> torch.Tensor:
        """The weight as the quantizer sees it, ``(out, in)``, detached float32."""
        return self._seen_by_quantizer().detach().float().flatten(1)

    def _seen_by_quantizer(self) -> torch.Tensor:
        """The weight as its quantized class's weight quantizer sees it (GPT-2's Conv1D: the transpose)."""
        cls = type(self.module) if is_quantized(self.module) else quantized_class_for(self.module)
        return weights_by_slot(self.module, cls)["weight_quantizer"]


def ignored_names(names: list[str], ignored_scope: IgnoredScope) -> set[str]:
    """The layer names ``ignored_scope`` selects: exact names or fnmatch wildcards, or a callable.

    Raises ValueError naming every string that selects no layer (usually a typo).
    """
    if ignored_scope is None:
        return set()
    if callable(ignored_scope):
        return {name for name in names if ignored_scope(name)}
    if isinstance(ignored_scope, str):
        raise TypeError(f"ignored_scope={ignored_scope!r}: expected a list of names or wildcards, not one string")
    selected, unmatched = set(), []
    for pattern in ignored_scope:
        if not isinstance(pattern, str):
            raise TypeError(f"ignored_scope entry {pattern!r}: expected a layer name or wildcard string")
        matches = {name for name in names if name == pattern or fnmatch.fnmatchcase(name, pattern)}
        if not matches:
            unmatched.append(pattern)
        selected |= matches
    if unmatched:
        raise ValueError(f"ignored_scope entries {unmatched} match no compressible layer")
    return selected


def find_weight_layers(model: nn.Module, ignored_scope: IgnoredScope = None,
                       other_names: Iterable[str] = ()) -> tuple[list[WeightLayer], bool, set[str]]:
    """(compressible layers in module order, whether the last matmul was skipped: ignored or tied, the names
    ``ignored_scope`` selects). ``other_names``: further weights the scope may name (fused experts)."""
    candidates = [(name, module, _kind(module)) for name, module in model.named_modules()]
    candidates = [(name, module, kind) for name, module, kind in candidates
                  if kind is not None and isinstance(getattr(module, "weight", None), torch.Tensor)]
    ignored = ignored_names([name for name, _, _ in candidates] + list(other_names), ignored_scope)
    last_matmul = next((name for name, _, kind in reversed(candidates) if kind == MATMUL), None)
    layers, owners, last_matmul_skipped = [], {}, False
    for name, module, kind in candidates:
        if name in ignored:
            last_matmul_skipped |= name == last_matmul
            continue
        owner = owners.setdefault(id(module.weight), name)
        if owner != name:
            last_matmul_skipped |= name == last_matmul
        layers.append(WeightLayer(name, module, kind, tied_to=None if owner == name else owner))
    return layers, last_matmul_skipped, ignored


def ratio_defining_layers(layers: list[WeightLayer], last_matmul_skipped: bool, all_layers: bool) -> list[WeightLayer]:
    """The layers whose weight count sets the primary share (see the module docstring)."""
    layers = [layer for layer in layers if layer.tied_to is None]
    matmuls = [layer for layer in layers if layer.kind == MATMUL]
    if not all_layers and not last_matmul_skipped:
        matmuls = matmuls[:-1]
    if all_layers:
        return matmuls + [layer for layer in layers if layer.kind == EMBEDDING]
    return matmuls
