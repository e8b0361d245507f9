"""Data-parallel calibration on ``torch.distributed``: each rank runs its shard of the calibration data and the
statistics are combined so that every rank ends with the same quantizers.

    torch.distributed.init_process_group("gloo")   # or "nccl", one process per GPU (torchrun)
    with lowbit.distributed.calibrating_across():
        lowbit.quantize(model, config, make_forward_loop(shard(batches)))

Inside :func:`calibrating_across` the calibration code combines, at the point where each statistic is complete:

- running maxima (activation ``amax`` of max calibrators, asymmetric ``amin``/``amax``, the per-channel input
  maxima behind analytic input ranges and SmoothQuant): elementwise max (min for ``amin``) over ranks;
- GPTQ / scale-estimation Hessians: the float64 sums of the batches' ``X_b^T X_b`` and the row counts, summed,
  so ``H = 2 sum_b X_b^T X_b / n`` is the Hessian of the union of the rows, to float32 rounding the same
  whatever the split;
- AWQ's statistics: ``sum |x|`` and its token count, and the Gram matrix of the sampled rows, summed; the rows
  sampled per batch are chosen from the number of batches over all ranks, so the samples are those one
  process would take on the union of the data; AWQ's clip search gathers every rank's sampled rows.

Outside the context (the default) every function here returns its input unchanged. Histogram, percentile,
MSE and entropy calibrators keep whole distributions, not a maximum: they raise inside the context.
Every rank must make the same calls in the same order (the same model and config, at least one batch each).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

import torch
from torch import Tensor

T = TypeVar("T")
_NOT_ACTIVE = object()
_group: ContextVar[object] = ContextVar("lowbit_calibration_group", default=_NOT_ACTIVE)


@contextmanager
def calibrating_across(group=None) -> Iterator[None]:
    """Combine calibration statistics over the ranks of ``group`` (None: the default process group) while the
    block runs. ``torch.distributed`` must be initialised."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("calibrating_across needs torch.distributed.init_process_group(...) to have run first")
    token = _group.set(group)
    try:
        yield
    finally:
        _group.reset(token)


def is_active() -> bool:
    """Whether calibration statistics are being combined over ranks (inside :func:`calibrating_across`)."""
    return _group.get() is not _NOT_ACTIVE


def is_first_rank() -> bool:
    """Whether this process is rank 0 of the calibration group, or calibration is not distributed: the one
    that writes results."""
    if not is_active():
        return True
    import torch.distributed as dist

    return dist.get_rank(_group.get()) == 0


def shard(items: Sequence[T], rank: int | None = None, world_size: int | None = None) -> list[T]:
    """This rank's share of ``items``: every ``world_size``-th item from ``rank`` (default: the process
    group's). ValueError if some rank would get nothing."""
    import torch.distributed as dist

    if rank is None or world_size is None:
        rank, world_size = dist.get_rank(), dist.get_world_size()
    if len(items) < world_size:
        raise ValueError(f"{len(items)} calibration batch(es) for {world_size} ranks: every rank needs one")
    return list(items[rank::world_size])


def sum_count(count: int) -> int:
    """``count`` summed over ranks."""
    if not is_active():
        return count
    import torch.distributed as dist

    total = torch.tensor([count], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(total, group=_group.get())
    return int(total.item())


def sum_tensor(tensor: Tensor) -> Tensor:
    """``tensor`` summed over ranks (a new tensor; same shape on every rank)."""
    if not is_active():
        return tensor
    import torch.distributed as dist

    total = tensor.clone()
    dist.all_reduce(total, group=_group.get())
    return total


def elementwise_max(tensors: list[Tensor | None], minimum: bool = False) -> list[Tensor | None]:
    """Each entry's elementwise max (min with ``minimum``) over ranks; None where a rank saw nothing (the
    others' value; None when none saw anything). One collective for the whole list; shapes may differ between
    entries but not between ranks."""
    if not is_active():
        return tensors
    import torch.distributed as dist

    gathered: list[list[Tensor | None]] = [None] * dist.get_world_size(_group.get())
    dist.all_gather_object(gathered, [None if t is None else t.detach().cpu() for t in tensors], group=_group.get())
    combine = torch.minimum if minimum else torch.maximum
    result = []
    for index, local in enumerate(tensors):
        seen = [rank_values[index] for rank_values in gathered if rank_values[index] is not None]
        if not seen:
            result.append(None)
            continue
        value = seen[0]
        for other in seen[1:]:
            value = combine(value, other)
        result.append(value.to(local.device if local is not None else "cpu"))
    return result


def gather_rows(rows: Tensor) -> Tensor:
    """The rows ``(n_r, d)`` of every rank, concatenated in rank order."""
    if not is_active():
        return rows
    import torch.distributed as dist

    gathered: list[Tensor] = [None] * dist.get_world_size(_group.get())
    dist.all_gather_object(gathered, rows.detach().cpu(), group=_group.get())
    return torch.cat(gathered).to(rows.device)


def _collective_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend(_group.get()) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
