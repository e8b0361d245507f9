"""torch's CUDA INT4 weight-only kernel (``torch.ops.aten._weight_int4pack_mm``, "tinygemm"), fed from lowbit's
packed storage once, for calls of at most ``MAX_ROWS`` rows (decoding).

Same arithmetic as the CPU kernel (``kernels.cpu``'s docstring): ``W[n, k] = (c[n, k] - 8) * S[k // g, n] +
Z[k // g, n]`` with ``S``, ``Z`` rounded once to bfloat16 and ``g`` in 32, 64, 128, 256. Its code layout comes from
``_convert_weight_to_int4pack`` on uint8 (N, K / 2) bytes holding ``c[n, 2j] << 4 | c[n, 2j + 1]`` (the even
column in the high nibble, unlike lowbit's low-nibble-first storage); it needs bfloat16 activations, N a multiple
of 8 and K a multiple of 16 x ``inner_k_tiles``.

Why beside the Triton kernels (``kernels.ops``), which take every other row count: at 1-4 rows tinygemm is the
faster kernel on the H100 (bench/results/kernels_h100.md, CUDA-graph replays, INT4 g128 over bf16 cuBLAS: M=1
2.05-2.54x against Triton's 1.54-2.30x on all four Llama shapes, M=4 1.80-1.94x against 1.48-2.17x, ahead on three of
four; at 16 rows and more it falls to 0.04-0.94x), and in eager mode a Triton launch costs 50-100 us of host time in
Triton's Python launcher, where batch-1 decoding is host-bound (bench/results/e2e_cuda_2026-12-07b.md: 105 us per INT4
layer call, 0.47x bf16 tok/s; through this op 34 us, 1.01x).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lowbit.kernels import cpu

if TYPE_CHECKING:
    from lowbit.compress.packed import PackedWeight

MAX_ROWS = 4  # the kernel's calls (decode steps); more rows go to the Triton kernels
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
