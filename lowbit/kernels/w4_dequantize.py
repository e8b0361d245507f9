"""Triton dequantization of packed 4-bit weights, bit-exact (for dequantize-then-cuBLAS at many rows).

``w4_dequantize`` writes the (N, K) weight that lowbit.formats' dequantization gives, bit for bit: float32
``(code - zero) / scale`` (correctly rounded, ``w4_shared.divide``), ``(code - zero) * scale`` or ``e2m1 *
(block_scale * global_scale)``, rounded once to the output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.w4_shared import BLOCK_K, KINDS, check_config, check_split, divide

DEQUANTIZE_CONFIG_KEYS = ("BLOCK_N", "K_BLOCKS", "num_warps")


@triton.jit
def _dequantize_block(words_ptr, scale_ptr, zero_ptr, global_scale_ptr, out_ptr, N, K, offs_n, kb,
                      KIND: tl.constexpr, GROUP_SIZE: tl.constexpr, ZERO_OFFSET: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """Rows ``offs_n``, K block ``kb`` (128 columns) of ``_w4_dequantize_kernel``."""
    GROUP: tl.constexpr = GROUP_SIZE if GROUP_SIZE < 128 else 128  # K elements of one scale within the block
    n_mask = offs_n < N
    words = tl.load(words_ptr + offs_n[:, None] * (K // 8) + kb * 16 + tl.arange(0, 16)[None, :],
                    mask=n_mask[:, None], other=0)
    shifts = 4 * tl.arange(0, 8)
    codes = tl.reshape((words[:, :, None] >> shifts[None, None, :]) & 15, (BLOCK_N, 128 // GROUP, GROUP))
    group = (kb * 128) // GROUP_SIZE + tl.arange(0, 128 // GROUP)  # the block's groups, in K order
    offsets = offs_n[:, None] * (K // GROUP_SIZE) + group[None, :]
    if KIND == 2:
        scale = tl.load(scale_ptr + offsets, mask=n_mask[:, None], other=0.0).to(tl.float32)
        scale = scale * tl.load(global_scale_ptr).to(tl.float32)  # rounded once, as lowbit.formats does
        # E2M1 bits under fp16's exponent read as e2m1 * 2**-14 (0.5 a subnormal); 2**14 joins the scale exactly
        half = (((codes & 7) << 9) | ((codes & 8) << 12)).to(tl.int16).to(tl.float16, bitcast=True)
        w = half.to(tl.float32) * (scale * 16384.0)[:, :, None]
    else:
        scale = tl.load(scale_ptr + offsets, mask=n_mask[:, None], other=1.0).to(tl.float32)
        if KIND == 1:
            zero = tl.load(zero_ptr + offsets, mask=n_mask[:, None], other=0).to(tl.float32)[:, :, None]
        else:
            zero = ZERO_OFFSET
        reciprocal = scale
        if KIND == 0:
            reciprocal = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
        # code as float32 without a conversion instruction: the bits of 2**23 + code, minus 2**23
        value = (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        w = divide(value - zero, scale[:, :, None], reciprocal[:, :, None], KIND)
    w = tl.reshape(w, (BLOCK_N, 128))
    out_ptrs = out_ptr + offs_n[:, None] * K + kb * 128 + tl.arange(0, 128)[None, :]
    tl.store(out_ptrs, w.to(out_ptr.dtype.element_ty), mask=n_mask[:, None])


@triton.jit
def _w4_dequantize_kernel(
    words_ptr, scale_ptr, zero_ptr, global_scale_ptr, out_ptr, N, K,
    KIND: tl.constexpr, GROUP_SIZE: tl.constexpr, ZERO_OFFSET: tl.constexpr, BLOCK_N: tl.constexpr,
    K_BLOCKS: tl.constexpr,
):
    """out (N, K) = lowbit.formats' dequantized weights in out's dtype, K_BLOCKS consecutive 128-wide K blocks
    per program (256 * K_BLOCKS contiguous bytes of each bf16 row): float32 ``(code - zero) / scale``
    (correctly rounded), ``(code - zero) * scale`` or ``e2m1 * (block_scale * global_scale)``, rounded once to
    out's dtype."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    for u in tl.static_range(K_BLOCKS):
        _dequantize_block(words_ptr, scale_ptr, zero_ptr, global_scale_ptr, out_ptr, N, K, offs_n,
                          tl.program_id(1) * K_BLOCKS + u, KIND, GROUP_SIZE, ZERO_OFFSET, BLOCK_N)


def w4_dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    kind: str,
    group_size: int,
    dtype: torch.dtype,
    zero_point: torch.Tensor | None = None,
    global_scale: torch.Tensor | None = None,
    zero_offset: int = 0,
    config: dict | None = None,
) -> torch.Tensor:
    """Dequantized weights (N, K) in ``dtype``, equal to lowbit.formats' dequantization bit for bit.
    ``config``: keys ``DEQUANTIZE_CONFIG_KEYS`` (rows per program, warps)."""
    check_config(config or {}, DEQUANTIZE_CONFIG_KEYS)
    n, k = codes.shape[0], codes.shape[1] * 2
    launch = {"BLOCK_N": 32, "K_BLOCKS": 1, "num_warps": 4, **(config or {})}
    check_split(k, 1, launch["K_BLOCKS"], "K_BLOCKS")
    out = torch.empty((n, k), device=codes.device, dtype=dtype)
    _w4_dequantize_kernel[(triton.cdiv(n, launch["BLOCK_N"]), k // BLOCK_K // launch["K_BLOCKS"])](
        codes.view(torch.int32), scale, zero_point if zero_point is not None else scale,
        global_scale if global_scale is not None else scale, out, n, k,
        KIND=KINDS[kind], GROUP_SIZE=group_size, ZERO_OFFSET=int(zero_offset), BLOCK_N=launch["BLOCK_N"],
        K_BLOCKS=launch["K_BLOCKS"], num_warps=launch["num_warps"],
    )
    return out
