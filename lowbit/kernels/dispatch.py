"""Choose the kernel for ``x @ dequantize(W).T + bias`` from the device, the weight format and M.

| device | weight                                        | rows M                   | kernel                           |
|--------|-----------------------------------------------|--------------------------|----------------------------------|
| CUDA   | INT<=4 sym / asym (groups >= 16), NVFP4 (16); | 1, long K (prefers_gemv) | Triton GEMV on CUDA cores        |
|        | K % 128 == 0; bf16 / fp16 activations         | other rows < 128         | Triton W4A16 on tensor cores     |
|        |                                               | >= DEQUANTIZE_FIRST_ROWS | Triton dequantize, then cuBLAS   |
| any    | anything else                                 | any                      | formats dequantize, F.linear     |

The fallback and the dequantize-first path multiply exactly the fake-quant weights with the same
``F.linear``, so their outputs equal the fake-quant model's bit for bit; the fused kernel multiplies the
same weight values (exactly: codes times scales) but rounds only its float32 sums, so it matches a
float64 product to the output's rounding. Triton is imported on first CUDA use only.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from lowbit.compress.packed import PackedWeight

KERNEL_K_MULTIPLE = 128
NVFP4_BLOCK = 16
SMALLEST_GROUP = 16
# bench/results/kernels_h100.md: up to 64 rows the fused kernel's decode tiles win everywhere; at 256 rows
# dequantize + cuBLAS win on 3 of the 4 shapes (fused 0.39-0.52x of bf16, dequantize-first 0.45-0.64x), at
# 2048 rows on all (0.80-0.90x against 0.41-0.51x).
DEQUANTIZE_FIRST_ROWS = 128
ACTIVATION_DTYPES = (torch.bfloat16, torch.float16)


@functools.cache
def triton_w4():
    """The Triton kernel module, or None when triton is not installed."""
    try:
        from lowbit.kernels import triton_w4 as module
    except ImportError:
        return None
    return module


def triton_arguments(packed: PackedWeight) -> dict | None:
    """Keyword arguments of ``triton_w4.w4_matmul`` for this weight, or None if no kernel applies."""
    fmt = packed.format
    k = packed.shape[1]
    if not fmt.packs_nibbles or k % KERNEL_K_MULTIPLE or packed.scale.shape[0] != packed.shape[0]:
        return None
    if not packed.codes.is_contiguous() or not packed.scale.is_contiguous():
        return None
    group_size = fmt.block_size or k
    if group_size < SMALLEST_GROUP or group_size & (group_size - 1) and group_size != k:
        return None  # the kernels tile K in steps of 128 split into power-of-two groups (or one group per row)
    if fmt.kind == "int":
        return dict(kind="int_divide", group_size=group_size, zero_offset=fmt.code_offset)
    if fmt.kind == "int_asym":
        return dict(kind="int_affine", group_size=group_size, zero_point=packed.zero_point)
    if fmt.kind == "nvfp4" and group_size == NVFP4_BLOCK:
        return dict(kind="nvfp4", group_size=group_size, global_scale=packed.global_scale)
    return None


def weight_only_linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """``x (..., K) @ packed.dequantize(x.dtype).T + bias`` -> (..., N) by the table above."""
    arguments = triton_arguments(packed) if x.is_cuda and x.dtype in ACTIVATION_DTYPES else None
    kernels = triton_w4() if arguments is not None else None
    if kernels is None:
        return F.linear(x, packed.dequantize(x.dtype), bias)
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] == 1 and kernels.prefers_gemv(*packed.shape):
        out = kernels.w4_gemv(rows, packed.codes, packed.scale, bias=bias, **arguments)
    elif rows.shape[0] >= DEQUANTIZE_FIRST_ROWS:
        weight = kernels.w4_dequantize(packed.codes, packed.scale, dtype=x.dtype, **arguments)
        out = F.linear(rows, weight, bias)
    else:
        out = kernels.w4_matmul(rows, packed.codes, packed.scale, bias=bias, **arguments)
    return out.reshape(*x.shape[:-1], packed.shape[0])
