"""The registry from an original module class to its quantized class, and the conversion of one module.

Conversion swaps the instance's class for the quantized subclass and calls its ``_setup()``, which
creates the quantizers; parameters, buffers and hooks stay where they are (no copy, no extra memory).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

QUANT_MODULE_REGISTRY: dict[type[nn.Module], type[nn.Module]] = {}
ClassFinder = Callable[[nn.Module], bool]
CLASS_FINDERS: list[ClassFinder] = []  # tried in order for a module type not yet in QUANT_MODULE_REGISTRY


class QuantModuleMixin:
    """Base of quantized modules. Subclasses list their quantizers in ``quantizer_names``."""

    quantizer_names: tuple[str, ...] = ("input_quantizer", "weight_quantizer", "output_quantizer")
    original_class: type[nn.Module]

    def _setup(self) -> None:
        from lowbit.quantizer import TensorQuantizer

        for name in self.quantizer_names:
            quantizer = TensorQuantizer()
            if name == "output_quantizer":
                quantizer.disable()
            setattr(self, name, quantizer)

    def weight_slots(self) -> dict[str, torch.Tensor]:
        """{weight quantizer slot: the tensor that quantizer sees}: here ``weight_quantizer`` sees ``weight``
        as stored. Classes that quantize a view (a transpose, a stack of experts) override this; it is also
        called unbound on the original module before conversion."""
        return {"weight_quantizer": self.weight} if isinstance(getattr(self, "weight", None), torch.Tensor) else {}


def register(original_cls: type[nn.Module], quantized_cls: type[nn.Module]) -> None:
    """Make ``quantize()`` turn every ``original_cls`` instance into ``quantized_cls``.

    ``quantized_cls`` must subclass ``original_cls`` (and ``QuantModuleMixin`` or define ``_setup()`` and
    ``quantizer_names``); its ``_setup()`` creates the quantizers, its ``forward`` applies them.
    """
    if not (isinstance(original_cls, type) and issubclass(original_cls, nn.Module)):
        raise TypeError(f"original_cls={original_cls!r}: expected an nn.Module subclass")
    if not (isinstance(quantized_cls, type) and issubclass(quantized_cls, original_cls)):
        raise TypeError(
            f"quantized_cls={quantized_cls!r} must subclass original_cls={original_cls.__name__} "
            "(lowbit converts a module by swapping its class)"
        )
    if not callable(getattr(quantized_cls, "_setup", None)):
        raise TypeError(f"quantized_cls={quantized_cls.__name__} needs a _setup() method that creates its quantizers")
    if not hasattr(quantized_cls, "quantizer_names"):
        quantized_cls.quantizer_names = QuantModuleMixin.quantizer_names
    quantized_cls.original_class = original_cls
    QUANT_MODULE_REGISTRY[original_cls] = quantized_cls


def unregister(original_cls: type[nn.Module]) -> None:
    QUANT_MODULE_REGISTRY.pop(original_cls, None)


def register_class_finder(finder: ClassFinder) -> None:
    """Add ``finder(module) -> bool``: it registers a quantized class for ``type(module)`` when it recognises
    the type (a family of classes, such as Hugging Face attention, that no fixed list names) and says so."""
    if finder not in CLASS_FINDERS:
        CLASS_FINDERS.append(finder)


def is_quantized(module: nn.Module) -> bool:
    return hasattr(type(module), "original_class") and hasattr(module, "quantizer_names")


def quantized_class_for(module: nn.Module) -> type[nn.Module] | None:
    """The registered quantized class for this exact module type (subclasses are not guessed).

    Types no fixed list names are registered on first sight by the class finders (Hugging Face attention and
    fused experts: ``lowbit.modules`` adds theirs from ``lowbit.modules.attention`` and ``lowbit.modules.experts``).
    """
    if type(module) not in QUANT_MODULE_REGISTRY:
        any(finder(module) for finder in CLASS_FINDERS)
    return QUANT_MODULE_REGISTRY.get(type(module))


def convert_module(module: nn.Module) -> nn.Module:
    """Swap ``module``'s class for its quantized class and create its quantizers (in place)."""
    quantized_cls = quantized_class_for(module)
    if quantized_cls is None:
        raise TypeError(f"{type(module).__name__} has no registered quantized class; see lowbit.register")
    module.__class__ = quantized_cls
    module._setup()
    return module


def revert_module(module: nn.Module) -> None:
    """Undo convert_module: drop the quantizers and restore the original class."""
    for name in module.quantizer_names:
        if name in module._modules:
            del module._modules[name]
    module.__class__ = type(module).original_class
