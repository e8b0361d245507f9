"""Memory footprint of a model: the bytes of the storages behind its parameters and buffers."""

from __future__ import annotations

import torch
from torch import nn


def model_size(model: nn.Module) -> int:
    """Bytes held by ``model``'s parameters and buffers, each underlying storage counted once.

    Tied or shared tensors and views of one storage count once, at the storage's size; a packed uint8
    buffer counts at its real size (one byte per element). Tensor subclasses that wrap inner tensors
    (``__tensor_flatten__``) count their inner tensors. Tensors on the ``meta`` device have no storage
    and count ``numel * element_size`` each.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    sizes: dict[tuple, int] = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for _, tensor in named:
        for key, nbytes in _storages(tensor):
            sizes[key] = nbytes
    return sum(sizes.values())


def _storages(tensor: torch.Tensor):
    """(identity key, bytes) of each storage behind ``tensor``."""
    if type(tensor) not in (torch.Tensor, nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        inner_names, _ = tensor.__tensor_flatten__()
        for name in inner_names:
            yield from _storages(getattr(tensor, name))
    elif tensor.device.type == "meta":
        yield ("meta", id(tensor)), tensor.numel() * tensor.element_size()
    else:
        storage = tensor.untyped_storage()
        yield (tensor.device, storage.data_ptr()), storage.nbytes()
