"""Activation quantization to FP8 E4M3 in one Triton kernel (for the W8A8 matmul of ``lowbit.kernels.scaled``).

Per row m of x (M, K), as ``lowbit.formats.quantize_fp(x, amax, E4M3)``:

    step = amax / 448, scale = 448 / amax (float32, correctly rounded; 1 where amax <= 2**-24)
    codes = e4m3(clamp(float32(x) / step, -448, 448))           (correctly rounded quotient, then nearest even)

with ``amax`` the row's max |x| (dynamic, per row) or one static calibrated value for the tensor. The
kernel writes ``codes`` into an (M_padded, K) buffer (rows past M zero, for cuBLAS's multiple-of-16 rows)
and ``1 / scale`` (per row, or once), the factor ``torch._scaled_mm`` multiplies by.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

E4M3_MAX = 448.0
TINY_AMAX = 2.0**-24


@triton.jit
def _quantize_rows_kernel(x_ptr, codes_ptr, inverse_scale_ptr, amax_ptr, M, K, stride_xm,
                          DYNAMIC: tl.constexpr, ROW_SCALES: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    live = tl.full((BLOCK_K,), row, tl.int32) < M  # a vector: the interpreter rejects a scalar mask operand
    x_row = x_ptr + row * stride_xm
    if DYNAMIC:
        amax = tl.zeros((BLOCK_K,), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_row + k0 + offs, mask=live & (k0 + offs < K), other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        amax = tl.max(amax, axis=0)
    else:
        amax = tl.load(amax_ptr).to(tl.float32)
    tiny = amax <= 5.9604644775390625e-08  # 2**-24
    safe_amax = tl.where(tiny, 1.0, amax)
    scale = tl.where(tiny, 1.0, tl.math.div_rn(448.0, safe_amax))
    step = tl.where(tiny, 1.0, tl.math.div_rn(safe_amax, 448.0))
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + offs < K
        x = tl.load(x_row + k0 + offs, mask=live & mask, other=0.0).to(tl.float32)
        codes = tl.clamp(tl.math.div_rn(x, step), -448.0, 448.0).to(tl.float8e4nv)
        tl.store(codes_ptr + row * K + k0 + offs, codes, mask=mask)
    inverse = tl.math.div_rn(1.0, scale)
    if ROW_SCALES:
        tl.store(inverse_scale_ptr + row, inverse)
    else:
        if row == 0:
            tl.store(inverse_scale_ptr, inverse)


def quantize_fp8(x: torch.Tensor, amax: torch.Tensor | None, padded_rows: int,
                 row_scales: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes float8_e4m3fn (padded_rows, K), inverse scale float32) of x (M, K) bf16 / fp16 / fp32.

    ``amax=None``: dynamic per-row scales; else the static per-tensor amax (a one-element tensor). The inverse
    scale is (padded_rows, 1) (1 for padding rows) when dynamic or ``row_scales``, else a scalar ().
    """
    m, k = x.shape
    if padded_rows < m:
        raise ValueError(f"padded_rows={padded_rows} must be >= the {m} rows of x")
    if x.stride(-1) != 1:
        x = x.contiguous()
    codes = torch.empty((padded_rows, k), device=x.device, dtype=torch.float8_e4m3fn)
    dynamic = amax is None
    per_row = dynamic or row_scales
    inverse_scale = torch.empty((padded_rows, 1) if per_row else (), device=x.device, dtype=torch.float32)
    block_k = min(triton.next_power_of_2(k), 2048)
    _quantize_rows_kernel[(padded_rows,)](x, codes, inverse_scale, amax if amax is not None else inverse_scale,
                                          m, k, x.stride(0), DYNAMIC=dynamic, ROW_SCALES=per_row, BLOCK_K=block_k,
                                          num_warps=4)
    return codes, inverse_scale
