"""Two 4-bit codes per byte, along the last axis, low nibble first.

    packed[..., j] = codes[..., 2 j] | codes[..., 2 j + 1] << 4        (uint8, codes in 0..15)

so element ``2 j`` sits in bits 0-3 of byte ``j`` and element ``2 j + 1`` in bits 4-7. Signed INT4
codes are stored offset-binary (``q + 8``) by the caller, E2M1 codes as their OCP bit pattern.
Viewed as little-endian int32 words, nibble ``i`` of word ``w`` (bits ``4 i .. 4 i + 3``) is element
``8 w + i``: the kernels rely on this.
"""

from __future__ import annotations

import torch

NIBBLE_MASK = 0x0F


def pack_uint4(codes: torch.Tensor) -> torch.Tensor:
    """Pack uint8 ``codes`` (..., L) with values 0..15 into uint8 (..., L // 2), low nibble first.

    Raises TypeError unless ``codes`` is uint8, ValueError when L is odd or a value exceeds 15.
    """
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        raise TypeError(f"codes must be a uint8 tensor, got {getattr(codes, 'dtype', type(codes).__name__)}")
    if codes.dim() == 0 or codes.shape[-1] % 2:
        raise ValueError(f"codes' last dim must be even to pack two per byte, got shape {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) > NIBBLE_MASK:
        raise ValueError(f"codes must lie in 0..15 to fit a nibble, got max {int(codes.max())}")
    pairs = codes.unflatten(-1, (-1, 2))
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_uint4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_uint4``: uint8 (..., L // 2) -> uint8 codes (..., L) in 0..15."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a uint8 tensor, got {getattr(packed, 'dtype', type(packed).__name__)}")
    if packed.dim() == 0:
        raise ValueError("packed must have at least one dimension")
    return torch.stack((packed & NIBBLE_MASK, packed >> 4), dim=-1).flatten(-2)
