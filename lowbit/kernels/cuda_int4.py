"""torch's CUDA INT4 weight-only kernel (``torch.ops.aten._weight_int4pack_mm``, "tinygemm"), fed from lowbit's
packed storage once, for the few-row calls of eager decoding.

Same arithmetic as the CPU kernel (``kernels.cpu``'s docstring): ``W[n, k] = (c[n, k] - 8) * S[k // g, n] +
Z[k // g, n]`` with ``S``, ``Z`` rounded once to bfloat16 and ``g`` in 32, 64, 128, 256. Its code layout comes from
``_convert_weight_to_int4pack`` on uint8 (N, K / 2) bytes holding ``c[n, 2j] << 4 | c[n, 2j + 1]`` (the even
column in the high nibble, unlike lowbit's low-nibble-first storage); it needs bfloat16 activations, N a multiple
of 8 and K a multiple of 16 x ``inner_k_tiles``.

Why beside the Triton kernels: an eager call of a Triton kernel costs 50-100 us of host time in Triton's Python
launcher (bench/results/e2e_cuda_2026-12-07.md: 105 us per INT4 layer call against nn.Linear's 20 us on the
H100), and batch-1 eager decoding is bound by host time, so there the aten op wins; under ``torch.compile`` CUDA
graphs remove launch costs and the Triton kernels (``kernels.ops``) run instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lowbit.kernels import cpu

if TYPE_CHECKING:
    from lowbit.compress.packed import PackedWeight

MAX_ROWS = 8  # eager calls of at most this many rows (decode steps; prefill goes to the Triton kernels)
ROW_MULTIPLE = 8
INNER_K_TILES = (8, 4, 2)  # largest first: the kernel's widest K tile that divides K


def inner_k_tiles(packed: PackedWeight) -> int | None:
    """The tile count for this weight, or None if the kernel does not take it (see the module docstring)."""
    n, k = packed.shape
    if cpu.int4_group_size(packed.format, packed.shape) is None or n % ROW_MULTIPLE:
        return None
    return next((tiles for tiles in INNER_K_TILES if k % (16 * tiles) == 0), None)


def operands(packed: PackedWeight) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(kernel codes int32, scale_and_zero (K / g, N, 2) bfloat16, g) for a weight ``inner_k_tiles`` accepts, on
    the packed weight's (CUDA) device. The kernel codes are a new tensor as large as ``packed.codes``."""
    nibbles = cpu.int4_nibbles(packed)
    pairs = (nibbles[:, 0::2] << 4 | nibbles[:, 1::2]).to(torch.uint8)
    kernel_codes = torch.ops.aten._convert_weight_to_int4pack(pairs, inner_k_tiles(packed))
    group = cpu.int4_group_size(packed.format, packed.shape)
    return kernel_codes, cpu.int4_scale_and_zero(packed, torch.bfloat16, group), group


def int4_linear(x: torch.Tensor, kernel_codes: torch.Tensor, scale_and_zero: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """x (M, K) bfloat16 -> (M, N) by the formula of the module docstring."""
    return torch.ops.aten._weight_int4pack_mm(x, kernel_codes, group_size, scale_and_zero)
