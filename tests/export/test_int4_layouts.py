"""lowbit's INT4 nibble storage <-> ModelOpt's row-paired INT4 bytes, converted in bytes, against the layouts written
out here bit by bit (lowbit: offset-binary ``c + 8`` paired along K, low nibble first; ModelOpt: two's complement
paired along N, ``byte(i, k) = c[2i, k] & 15 | (c[2i + 1, k] & 15) << 4``)."""

import pytest
import torch

from lowbit.export.modelopt_hf import nibbles_from_rows, rows_from_nibbles


def lowbit_bytes(codes: torch.Tensor) -> torch.Tensor:
    n, k = codes.shape
    out = torch.zeros(n, k // 2, dtype=torch.uint8)
    for i in range(n):
        for j in range(k // 2):
            out[i, j] = (int(codes[i, 2 * j]) + 8) | ((int(codes[i, 2 * j + 1]) + 8) << 4)
    return out


def modelopt_bytes(codes: torch.Tensor) -> torch.Tensor:
    n, k = codes.shape
    out = torch.zeros(n // 2, k, dtype=torch.uint8)
    for i in range(n // 2):
        for j in range(k):
            out[i, j] = (int(codes[2 * i, j]) % 16) | ((int(codes[2 * i + 1, j]) % 16) << 4)
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_conversions_match_both_layouts_for_every_code(seed):
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(-8, 8, (10, 24), generator=generator)
    codes[0, :16] = torch.arange(-8, 8)  # every code at least once
    lowbit, modelopt = lowbit_bytes(codes), modelopt_bytes(codes)
    assert torch.equal(rows_from_nibbles(lowbit), modelopt)
    assert torch.equal(nibbles_from_rows(modelopt), lowbit)


def test_odd_rows_are_refused_naming_the_count():
    with pytest.raises(ValueError, match="out_features 3 must be even"):
        rows_from_nibbles(torch.zeros(3, 4, dtype=torch.uint8))
