"""to_blocks / from_blocks / block_amax vs explicit slicing loops."""

from __future__ import annotations

import pytest
import torch

from lowbit.formats import block_amax, from_blocks, to_blocks

from .reference import random_with_outliers


@pytest.mark.parametrize("shape, axis", [((8, 64), -1), ((8, 64), 1), ((64, 8), 0), ((3, 32, 5), 1), ((3, 5, 32), -1)])
def test_blocks_match_slicing_and_round_trip(shape, axis):
    generator = torch.Generator().manual_seed(1)
    x = random_with_outliers(shape, generator)
    block_size = 16
    blocks = to_blocks(x, block_size, axis)
    moved = x.movedim(axis, -1)
    assert blocks.shape == (*moved.shape[:-1], shape[axis] // block_size, block_size)
    for j in range(shape[axis] // block_size):
        assert torch.equal(blocks[..., j, :], moved[..., j * block_size : (j + 1) * block_size])
    assert torch.equal(from_blocks(blocks, x.shape, axis), x)
    amax = block_amax(x, block_size, axis)
    assert amax.shape == (*blocks.shape[:-1], 1)
    assert torch.equal(amax[..., 0], blocks.abs().amax(dim=-1))


def test_blocks_keep_integer_dtypes():
    codes = torch.arange(32, dtype=torch.uint8).reshape(2, 16)
    assert torch.equal(from_blocks(to_blocks(codes, 8), codes.shape), codes)


def test_indivisible_length_names_block_size_length_and_axis():
    with pytest.raises(ValueError, match=r"block_size 16 must divide the length 40 of axis 1"):
        to_blocks(torch.zeros(3, 40), 16, axis=1)
    with pytest.raises(ValueError, match="block_size"):
        to_blocks(torch.zeros(3, 32), 0)
    with pytest.raises(ValueError, match="axis"):
        to_blocks(torch.zeros(3, 32), 16, axis=2)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        block_amax(torch.zeros(3, 32, dtype=torch.int32), 16)
