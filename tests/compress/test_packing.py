"""Nibble packing: layout (low nibble first), round trips, int32 word order, errors."""

from __future__ import annotations

import pytest
import torch

from lowbit.compress.packing import pack_uint4, unpack_uint4


def test_layout_low_nibble_first():
    codes = torch.tensor([[1, 2, 15, 0], [7, 8, 3, 12]], dtype=torch.uint8)
    expected = [[1 + 2 * 16, 15 + 0 * 16], [7 + 8 * 16, 3 + 12 * 16]]  # element 2j low, 2j+1 high
    assert pack_uint4(codes).tolist() == expected


def test_round_trip_random_codes():
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (3, 5, 64), generator=generator, dtype=torch.uint8)
    packed = pack_uint4(codes)
    assert packed.shape == (3, 5, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_uint4(packed), codes)


def test_int32_words_hold_eight_consecutive_codes():
    generator = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (2, 16), generator=generator, dtype=torch.uint8)
    words = pack_uint4(codes).view(torch.int32)  # little-endian, as the Triton kernels read activations
    for row in range(2):
        for word in range(2):
            value = int(words[row, word]) & 0xFFFFFFFF
            nibbles = [(value >> (4 * i)) & 0xF for i in range(8)]
            assert nibbles == codes[row, 8 * word : 8 * word + 8].tolist()


@pytest.mark.parametrize(
    "codes, error",
    [
        (torch.zeros(4, dtype=torch.int8), TypeError),
        (torch.zeros(3, dtype=torch.uint8), ValueError),
        (torch.tensor([16, 0], dtype=torch.uint8), ValueError),
        (torch.tensor(3, dtype=torch.uint8), ValueError),
    ],
)
def test_pack_errors(codes, error):
    with pytest.raises(error, match="codes"):
        pack_uint4(codes)


def test_unpack_errors():
    with pytest.raises(TypeError, match="packed"):
        unpack_uint4(torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="packed"):
        unpack_uint4(torch.tensor(3, dtype=torch.uint8))
