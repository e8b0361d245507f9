"""Choose the kernel for ``x @ dequantize(W).T + bias`` from the device, the weight format and M.

| device | weight                                 | rows M                   | kernel                              |
|--------|----------------------------------------|--------------------------|-------------------------------------|
| CUDA   | INT<=4 sym / asym, NVFP4; K % 128 == 0 | < DEQUANTIZE_FIRST_ROWS  | Triton W4A16 (``triton_w4``)        |
| CUDA   | same                                   | >= DEQUANTIZE_FIRST_ROWS | Triton dequantize, then cuBLAS      |
|        | (NVFP4's groups of 16: from 32 rows)   |                          |                                     |
| any    | anything else                          | any                      | lowbit.formats dequantize, F.linear |

The fallback and the dequantize-first path multiply exactly the fake-quant weights with the same
``F.linear``, so their outputs equal the fake-quant model's bit for bit; the fused kernel uses the
same weights but its own fp32 accumulation order. Triton is imported on first CUDA use only.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from lowbit.compress.packed import PackedWeight

KERNEL_K_MULTIPLE = 128
# bench/results/kernels_h100.md: from M = 256 on, dequantize + cuBLAS is as fast as or faster than
# the fused kernel on every benchmarked shape (and at M = 2048 about twice as fast).
DEQUANTIZE_FIRST_ROWS = 256
# Groups of 16 (NVFP4) only get the mma.sync tiles (see triton_w4.SMALLEST_WGMMA_GROUP): at M = 64 they
# ran at 0.28x of bf16 against 0.41x for dequantize + cuBLAS on 8192x28672.
SMALL_GROUP_DEQUANTIZE_FIRST_ROWS = 32
SMALL_GROUP = 32
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
    group_size = fmt.block_size or k
    if fmt.block_size is not None and fmt.block_size & (fmt.block_size - 1):
        return None  # the kernels tile K in powers of two
    if fmt.kind == "int":
        return dict(kind="int_divide", group_size=group_size, zero_offset=fmt.code_offset)
    if fmt.kind == "int_asym":
        return dict(kind="int_affine", group_size=group_size, zero_point=packed.zero_point)
    if fmt.kind == "nvfp4":
        return dict(kind="nvfp4", group_size=group_size, global_scale=packed.global_scale)
    return None


def weight_only_linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """``x (..., K) @ packed.dequantize(x.dtype).T + bias`` -> (..., N) by the table above."""
    arguments = triton_arguments(packed) if x.is_cuda and x.dtype in ACTIVATION_DTYPES else None
    kernels = triton_w4() if arguments is not None else None
    if kernels is None:
        return F.linear(x, packed.dequantize(x.dtype), bias)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    small_group = arguments["group_size"] < SMALL_GROUP
    if rows.shape[0] >= (SMALL_GROUP_DEQUANTIZE_FIRST_ROWS if small_group else DEQUANTIZE_FIRST_ROWS):
        weight = kernels.w4_dequantize(packed.codes, packed.scale, dtype=x.dtype, **arguments)
        out = F.linear(rows, weight, bias)
    else:
        out = kernels.w4_matmul(rows, packed.codes, packed.scale, bias=bias, **arguments)
    return out.reshape(*x.shape[:-1], packed.shape[0])
