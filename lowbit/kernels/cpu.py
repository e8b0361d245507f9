"""torch's CPU weight-only kernels, fed from lowbit's packed storage once, at compress time.

INT4 (``torch.ops.aten._weight_int4pack_mm_for_cpu``), for a weight (N, K) of nibble codes ``c`` in 0..15
with groups of ``g`` K elements (g in 32, 64, 128, 256; N a multiple of 16):

    out = x @ W.T,   W[n, k] = (c[n, k] - 8) * S[k // g, n] + Z[k // g, n]

``S`` and ``Z`` travel as ``scale_and_zero`` (K / g, N, 2) in the activation dtype; the codes in the
kernel's own layout (``_convert_weight_to_int4pack_for_cpu``: uint8 (N, K / 2), tiles of rows interleaved,
not lowbit's low-nibble-first rows). lowbit's formats map onto it exactly in real arithmetic:

- symmetric ``int`` (codes stored ``q + 8``, ``w = q / scale``): ``S = 1 / scale``, ``Z = 0``;
- asymmetric ``int_asym`` (``w = (c - zero_point) * scale``): ``S = scale``, ``Z = (8 - zero_point) * scale``.

``S`` and ``Z`` round once to the activation dtype (at most 2**-8 relative in bfloat16, its unit roundoff); a
lowbit block of ``b`` elements that is a multiple of a kernel group (per channel: ``b = K``) repeats its
scale over ``b / g`` groups. INT8 per channel (``torch.ops.aten._weight_int8pack_mm``) reads lowbit's int8
codes (N, K) as they are stored, with ``scales[n] = 1 / scale[n]`` in the activation dtype:

    out[m, n] = sum_k x[m, k] * codes[n, k] * scales[n]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lowbit.compress.packed import PackedWeight, WeightFormat

INT4_GROUPS = (256, 128, 64, 32)  # the kernel's group sizes, largest first (fewest scales)
INT4_ROW_MULTIPLE = 16
INT4_ZERO_CODE = 8
INNER_K_TILES = 2  # torch's API asks for one; the CPU layout is the same for 1, 2, 4 and 8


def int4_group_size(fmt: WeightFormat, shape: tuple[int, int]) -> int | None:
    """The kernel group for a 4-bit ``int`` / ``int_asym`` weight of ``shape``, or None if none fits."""
    n, k = shape
    if fmt.kind not in ("int", "int_asym") or fmt.num_bits != 4 or fmt.unsigned or n % INT4_ROW_MULTIPLE:
        return None
    block = fmt.block_size or k
    return next((group for group in INT4_GROUPS if block % group == 0 and k % group == 0), None)


def int4_operands(packed: PackedWeight, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(kernel codes uint8 (N, K / 2), scale_and_zero (K / g, N, 2) in ``dtype``, g) for a weight that
    ``int4_group_size`` accepts. The kernel codes are a new tensor as large as ``packed.codes``."""
    group = int4_group_size(packed.format, packed.shape)
    kernel_codes = torch.ops.aten._convert_weight_to_int4pack_for_cpu(int4_nibbles(packed), INNER_K_TILES)
    return kernel_codes, int4_scale_and_zero(packed, dtype, group), group


def int4_nibbles(packed: PackedWeight) -> torch.Tensor:
    """int32 (N, K): the stored nibbles ``c`` in 0..15 of a 4-bit ``int`` / ``int_asym`` weight."""
    return (packed.element_values() + packed.format.code_offset).to(torch.int32)


def int4_scale_and_zero(packed: PackedWeight, dtype: torch.dtype, group: int) -> torch.Tensor:
    """(K / g, N, 2) ``(S, Z)`` of the module docstring in ``dtype``, one pair per kernel group of ``group``."""
    fmt = packed.format
    n, k = packed.shape
    scale = packed.scale.float().expand(n, -1)  # (N, K / b) or (N, 1)
    if fmt.kind == "int":
        step, zero = scale.reciprocal(), torch.zeros_like(scale)
    else:
        step = scale
        zero = (INT4_ZERO_CODE - packed.zero_point.float().expand(n, -1)) * scale
    repeats = k // group // step.shape[1]
    pairs = torch.stack((step, zero), dim=-1).repeat_interleave(repeats, dim=1)  # (N, K / g, 2)
    return pairs.transpose(0, 1).contiguous().to(dtype)


def int4_linear(x: torch.Tensor, kernel_codes: torch.Tensor, scale_and_zero: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """x (M, K) -> (M, N) by the INT4 formula of the module docstring."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, kernel_codes, group_size, scale_and_zero)


def int8_accepts(fmt: WeightFormat) -> bool:
    """Signed INT8 with one scale per output row (or per tensor, repeated)."""
    return fmt.kind == "int" and fmt.num_bits == 8 and not fmt.unsigned and fmt.block_size is None


def int8_scales(packed: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """(N,) multipliers ``1 / scale`` in ``dtype`` for ``_weight_int8pack_mm``."""
    return packed.scale.float().reciprocal().reshape(-1).expand(packed.shape[0]).contiguous().to(dtype)


def int8_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) -> (M, N) by the INT8 formula of the module docstring."""
    return torch.ops.aten._weight_int8pack_mm(x, codes, scales)
