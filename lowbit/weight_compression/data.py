"""compress_weights' ``dataset``: an iterable of model inputs, each fed to the model as NNCF feeds it.

An item that is a dict is passed as keyword arguments (``model(**item)``, e.g. a batch from
``lowbit.data.calibration_batches``), a tuple or list as positional arguments, anything else as the
one argument. Tensors are moved to the model's device first.

:func:`stacked_items` joins consecutive batch-1 dict items into larger batches, for passes whose
statistics are sums over the token rows of all calls (the Hessians of scale estimation and GPTQ, the
layer output MSEs): fewer, larger calls give the same sums up to float rounding, in less time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lowbit.data.calibration import module_device


def materialize(dataset: Iterable[Any] | None) -> list[Any] | None:
    """The items of ``dataset`` as a list (it is read more than once), or None; ValueError when empty."""
    if dataset is None:
        return None
    if isinstance(dataset, (torch.Tensor, dict, str)):
        raise TypeError(
            f"dataset: expected an iterable of model inputs (e.g. a list of dicts), got one {type(dataset).__name__}"
        )
    items = list(dataset)
    if not items:
        raise ValueError("dataset is empty: pass at least one model input")
    return items


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: _to_device(item, device) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(item, device) for item in value)
    return value


def run_model(model: nn.Module, item: Any) -> None:
    """One forward pass of ``model`` on ``item`` (see the module docstring), output discarded."""
    item = _to_device(item, module_device(model))
    if isinstance(item, dict):
        model(**item)
    elif isinstance(item, (tuple, list)):
        model(*item)
    else:
        model(item)


def _stacking_key(item: Any) -> tuple | None:
    """What two items must share to be stacked: the keys, and per key the tensor's shape, dtype and device
    or the non-tensor value itself; None when ``item`` is not a dict of tensors each of shape ``(1, ...)``."""
    if not isinstance(item, dict) or not any(isinstance(value, torch.Tensor) for value in item.values()):
        return None
    key = []
    for name, value in item.items():
        if isinstance(value, torch.Tensor):
            if value.dim() == 0 or value.shape[0] != 1:
                return None
            key.append((name, True, (tuple(value.shape), value.dtype, value.device)))
        else:
            key.append((name, False, value))
    return tuple(key)


def _same_key(a: tuple | None, b: tuple | None) -> bool:
    if a is None or b is None or len(a) != len(b):
        return False
    for (name_a, tensor_a, value_a), (name_b, tensor_b, value_b) in zip(a, b, strict=True):
        if name_a != name_b or tensor_a != tensor_b:
            return False
        try:
            if not (value_a is value_b or bool(value_a == value_b)):
                return False
        except Exception:  # a value without a plain truth value for ==: not stackable
            return False
    return True


def stacked_items(items: list[Any], max_batch: int = 8, max_elements: int = 4096) -> list[Any]:
    """``items`` with each run of up to ``max_batch`` consecutive stackable items joined into one, as long
    as the joined largest tensor has at most ``max_elements`` elements (input ids: tokens), so that one
    stacked call needs no more activation memory than a single ``max_elements``-token item would.

    Stackable: dicts with the same keys (in the same order) whose tensors all have shape ``(1, ...)``,
    equal per key in shape, dtype and device, and whose other values are equal; a run becomes one dict
    with every tensor concatenated along dim 0 (item order kept) and the other values shared. Other items
    (tuples, bare tensors, dicts without tensors or with a batch dim other than 1) are returned unchanged,
    in place. Values are never modified; ValueError unless ``max_batch`` and ``max_elements`` are
    positive ints.
    """
    for name, value in (("max_batch", max_batch), ("max_elements", max_elements)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive int")
    result: list[Any] = []
    run: list[dict] = []
    run_key: tuple | None = None
    for item in items:
        key = _stacking_key(item)
        full = run and (len(run) == max_batch or (len(run) + 1) * _largest(run[0]) > max_elements)
        if run and (full or not _same_key(key, run_key)):
            result.append(_joined(run))
            run = []
        if key is None:
            result.append(item)
            continue
        if not run:
            run_key = key
        run.append(item)
    if run:
        result.append(_joined(run))
    return result


def _largest(item: dict) -> int:
    return max(value.numel() for value in item.values() if isinstance(value, torch.Tensor))


def _joined(run: list[dict]) -> dict:
    if len(run) == 1:
        return run[0]
    first = run[0]
    return {name: torch.cat([item[name] for item in run]) if isinstance(value, torch.Tensor) else value
            for name, value in first.items()}


def forward_loop(items: list[Any]) -> Callable[[nn.Module], None]:
    """A ``forward_loop(model)`` for lowbit's calibration algorithms: every item, in eval mode, no grad."""

    def loop(model: nn.Module) -> None:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for item in items:
                    run_model(model, item)
        finally:
            model.train(was_training)

    return loop
