"""compress_weights' ``dataset``: an iterable of model inputs, each fed to the model as NNCF feeds it.

An item that is a dict is passed as keyword arguments (``model(**item)``, e.g. a batch from
``lowbit.data.calibration_batches``), a tuple or list as positional arguments, anything else as the
one argument. Tensors are moved to the model's device first.
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
