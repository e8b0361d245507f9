"""Blocking along one axis: ``(..., L, ...) -> (..., n_blocks, block_size)`` with that axis moved last."""

from __future__ import annotations

import torch

from ._common import as_float32, check_block_size


def to_blocks(x: torch.Tensor, block_size: int, axis: int = -1) -> torch.Tensor:
    """Move ``axis`` last and split it into blocks: shape ``(*other_dims, L // block_size, block_size)``.

    ``other_dims`` keep their order. Raises ValueError when ``L`` is not divisible by ``block_size``.
    Works for any dtype (values are only reshaped).
    """
    check_block_size(block_size)
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis must be in [{-x.dim()}, {x.dim() - 1}] for a {x.dim()}-d tensor, got {axis}")
    length = x.shape[axis]
    if length % block_size != 0:
        raise ValueError(
            f"block_size {block_size} must divide the length {length} of axis {axis} (shape {tuple(x.shape)})"
        )
    moved = x.movedim(axis, -1)
    return moved.reshape(*moved.shape[:-1], length // block_size, block_size)


def from_blocks(blocks: torch.Tensor, shape: torch.Size | tuple[int, ...], axis: int = -1) -> torch.Tensor:
    """Inverse of ``to_blocks``: ``from_blocks(to_blocks(x, b, axis), x.shape, axis)`` equals ``x``."""
    shape = tuple(shape)
    axis = axis % len(shape)
    moved_shape = shape[:axis] + shape[axis + 1 :] + (shape[axis],)
    return blocks.reshape(moved_shape).movedim(-1, axis)


def block_amax(x: torch.Tensor, block_size: int, axis: int = -1) -> torch.Tensor:
    """Max of |x| per block, float32, shape ``(*other_dims, L // block_size, 1)`` (broadcasts on blocks)."""
    return to_blocks(as_float32(x, "x"), block_size, axis).abs().amax(dim=-1, keepdim=True)


def blocks_for_scales(values: torch.Tensor, scales: torch.Tensor, values_name: str, scales_name: str) -> torch.Tensor:
    """Split ``values`` (..., K) into the blocks of per-block ``scales`` (..., n_blocks) along the last axis.

    The block size is K // n_blocks; ValueError unless the leading dims agree and n_blocks divides K.
    """
    leading_dims_agree = scales.dim() >= 1 and values.shape[:-1] == scales.shape[:-1]
    if not leading_dims_agree or scales.shape[-1] == 0 or values.shape[-1] % scales.shape[-1] != 0:
        raise ValueError(
            f"{scales_name} of shape {tuple(scales.shape)} must be (..., n_blocks) with n_blocks dividing "
            f"the last dim of {values_name} of shape {tuple(values.shape)}"
        )
    return to_blocks(values, values.shape[-1] // scales.shape[-1])
