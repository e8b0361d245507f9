"""The hidden states between decoder blocks, one tensor per calibration batch: in host memory up to a budget,
on disk beyond it.

A :class:`HostBudget` is shared by every store of a run: a tensor is kept in RAM while the stores together hold
at most ``budget`` bytes, else it is written to its own file under ``directory`` (``torch.save``) and read back,
memory-mapped, each time a pass asks for that batch; files go when the store is closed. Tensors come back on
``device`` (the accelerator the block runs on).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor


class HostBudget:
    """Bytes of host memory the activation stores may still take (None: no limit)."""

    def __init__(self, budget: int | None, directory: str | Path | None = None) -> None:
        self.left = budget
        if directory is not None:
            Path(directory).mkdir(parents=True, exist_ok=True)
        self.directory = Path(tempfile.mkdtemp(prefix="lowbit-activations-", dir=directory))
        self.peak_on_disk = 0
        self.on_disk = 0
        self._files = 0

    def take(self, nbytes: int) -> bool:
        if self.left is not None and nbytes > self.left:
            return False
        if self.left is not None:
            self.left -= nbytes
        return True

    def give(self, nbytes: int) -> None:
        if self.left is not None:
            self.left += nbytes

    def new_file(self) -> Path:
        self._files += 1
        return self.directory / f"batch-{self._files}.pt"

    def close(self) -> None:
        for file in self.directory.glob("*.pt"):
            file.unlink()
        self.directory.rmdir()


class ActivationStore:
    """One block's outputs, batch by batch (``append``, ``store[i]``, ``len``): in RAM within the shared
    :class:`HostBudget`, else on disk."""

    def __init__(self, budget: HostBudget, device: torch.device) -> None:
        self.budget = budget
        self.device = device
        self._items: list[Tensor | Path] = []
        self._held = 0

    def append(self, output: Tensor) -> None:
        output = output.detach()
        nbytes = output.numel() * output.element_size()
        if self.budget.take(nbytes):
            self._held += nbytes
            self._items.append(output.cpu())
            return
        file = self.budget.new_file()
        torch.save(output.cpu(), file)
        self.budget.on_disk += nbytes
        self.budget.peak_on_disk = max(self.budget.peak_on_disk, self.budget.on_disk)
        self._items.append(file)

    def __getitem__(self, index: int) -> Tensor:
        item = self._items[index]
        if isinstance(item, Path):
            item = torch.load(item, mmap=True)
        return item.to(self.device)

    def __len__(self) -> int:
        return len(self._items)

    def __del__(self) -> None:  # a store dropped unclosed (the layer-wise step's unused references)
        self.close()

    def close(self) -> None:
        """Free the RAM and delete the files."""
        for item in self._items:
            if isinstance(item, Path):
                self.budget.on_disk -= item.stat().st_size if item.exists() else 0
                item.unlink(missing_ok=True)
        self.budget.give(self._held)
        self._items, self._held = [], 0


class StoredCalls(Sequence):
    """A block's calls, one per batch, for ``lowbit.structure.inputs.LayerInputs``: the hidden states from an
    :class:`ActivationStore` (read when the call is), the other arguments (masks, position embeddings) kept."""

    def __init__(self, hidden: ActivationStore, others: list[tuple[tuple, dict, bool]]) -> None:
        self.hidden = hidden
        self.others = others  # (args after the hidden states, kwargs, hidden states passed by keyword)

    def __len__(self) -> int:
        return len(self.others)

    def __getitem__(self, index: int) -> tuple[tuple, dict]:
        args, kwargs, by_keyword = self.others[index]
        states = self.hidden[index]
        if by_keyword:
            return args, {**kwargs, "hidden_states": states}
        return (states, *args), kwargs

    def __iter__(self) -> Iterator[tuple[tuple, dict]]:
        for index in range(len(self)):
            yield self[index]

    def following(self, hidden: ActivationStore) -> StoredCalls:
        """The same calls with the next block's hidden states."""
        return StoredCalls(hidden, self.others)


def split_call(args: tuple, kwargs: dict) -> tuple[Tensor, tuple[tuple, dict, bool]]:
    """A recorded block call as (hidden states, the rest as :class:`StoredCalls` keeps it)."""
    if args:
        return args[0], (args[1:], kwargs, False)
    rest = dict(kwargs)
    return rest.pop("hidden_states"), ((), rest, True)
