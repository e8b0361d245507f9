"""Triton kernels for 4-bit weights x 16-bit activations: ``out = x @ dequantize(W).T (+ bias)``.

Weight storage (``lowbit.compress.packing``): ``codes`` uint8 (N, K // 2), two 4-bit codes per byte along
K, low nibble first, read here as int32 words of 8 codes; one scale per ``group_size`` K elements of a row.

``w4_matmul`` computes, per output row n and K step of 128 (16 words):

- the exact 16-bit operands of ``lowbit.kernels.nibbles``: ``code - zero`` for integers, ``e2m1 * block_scale
  / 128`` for NVFP4 (both exact in bf16 / fp16), as eight (BLOCK_N, 16) tiles, tile i for K = {8 j + i};
- their products with the matching activation columns on the tensor cores (``tl.dot``, weights as the
  first operand, so that BLOCK_N >= 64 rows fill the wgmma M dimension even for one activation row),
  accumulated in float32;
- the group scale: integer formats whose groups are whole steps (128, 256, ..., per channel) multiply the
  step's float32 sum by ``1 / scale`` (symmetric, ModelOpt's ``w = q / scale``) or ``scale`` (asymmetric)
  once per row and step (``SCALE_AFTER_DOT``); otherwise each weight is scaled in float32 before the dot
  and rounded once to the activation dtype (``q / scale`` correctly rounded by a Markstein correction, so
  the operand equals lowbit.formats' dequantized weight); NVFP4 multiplies the whole sum by
  ``128 * global_scale`` at the end.

So the weights are never approximated: the only roundings are float32 accumulation and the output's.
Activation columns {8 j + i} are gathered (stride 8), or read from a copy of x permuted once by
``_permute_kernel`` (``X_PERMUTED``, the default): their tiles are then contiguous and stream through the
same pipelined asynchronous copies as the codes, instead of a shared-memory store and barrier per tile.

Split-K (``SPLIT_K`` > 1): each program adds its float32 partial tile to a workspace with atomics; the last
program of a tile (a per-tile arrival counter) takes the sums (atomic exchange with 0, which also resets the
workspace for the next call), resets the counter and writes the output. Workspace and counters are cached
per device; calls on one device must not overlap on different streams.

``w4_gemv`` computes the same product for one activation row on the CUDA cores (one float32 FMA per weight, see
``_w4_gemv_kernel``); ``prefers_gemv`` says for which weight shapes it measured faster than ``w4_matmul``.
``UNROLL`` (both kernels): consecutive steps per loop iteration, so each program reads 64 * UNROLL contiguous
bytes of every weight row at a time.

``w4_dequantize`` writes the dequantized (N, K) weight bit-exactly (for dequantize-then-cuBLAS).
This module imports triton at import time; ``lowbit.kernels.dispatch`` imports it only on CUDA.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from lowbit.kernels.nibbles import (
    E2M1_FLOAT_SCALE,
    E2M1_RESCALE,
    e2m1_codes,
    e2m1_floats,
    int_codes,
    sixteen_plus_codes,
    zero_pairs,
)

INT_DIVIDE, INT_AFFINE, NVFP4 = 0, 1, 2
KINDS = {"int_divide": INT_DIVIDE, "int_affine": INT_AFFINE, "nvfp4": NVFP4}
BLOCK_K = 128  # K elements per step: 16 int32 words of codes
MULTIPROCESSORS = 132  # H100 SXM: the launch defaults aim at a number of programs per multiprocessor
CONFIG_KEYS = ("BLOCK_N", "BLOCK_M", "SPLIT_K", "UNROLL", "num_warps", "num_stages", "X_PERMUTED",
               "SCALE_AFTER_DOT")
GEMV_CONFIG_KEYS = ("BLOCK_N", "SPLIT_K", "UNROLL", "num_warps", "num_stages")
DEQUANTIZE_CONFIG_KEYS = ("BLOCK_N", "K_BLOCKS", "num_warps")


@triton.jit
def _divide(q, scale, reciprocal, KIND: tl.constexpr):
    """Float32 weights of exact codes ``q``: ``q / scale`` correctly rounded (one Markstein correction of
    ``q * reciprocal``, ``reciprocal`` = 1 / scale correctly rounded) or ``q * scale`` (asymmetric)."""
    if KIND == 0:
        y = q * reciprocal
        w = tl.fma(tl.fma(-y, scale, q), reciprocal, y)
    else:
        w = q * scale
    return w


@triton.jit
def _operands(words, kb, offs_n, n_mask, j, scale_index, scale_ptr, zero_ptr, n_groups,
              KIND: tl.constexpr, GROUP_SIZE: tl.constexpr, ZERO_OFFSET: tl.constexpr,
              SCALE_AFTER_DOT: tl.constexpr, IS_BF16: tl.constexpr, DTYPE: tl.constexpr, USE_ASM: tl.constexpr):
    """(eight (BLOCK_N, 16) ``DTYPE`` operand tiles, per-row multiplier for SCALE_AFTER_DOT) of K block ``kb``;
    ``IS_BF16``: the activations' type (the magic numbers of ``zero_pairs``); ``scale_index``: NVFP4's block of
    each word within the step, j // 2, broadcast to the words' shape."""
    if KIND == 2:  # blocks of 16: the step's 8 E4M3 scales of a row are two int32 words (bytes in K order)
        scale_words = scale_ptr + offs_n * (n_groups // 4) + kb * 2
        low = tl.broadcast_to(tl.load(scale_words, mask=n_mask, other=0)[:, None], words.shape)
        high = tl.broadcast_to(tl.load(scale_words + 1, mask=n_mask, other=0)[:, None], words.shape)
        weights = e2m1_codes(words, low, high, scale_index, DTYPE, USE_ASM)
        multiplier = tl.full(offs_n.shape, 1.0, tl.float32)
    elif SCALE_AFTER_DOT:  # the whole step lies in one group: one scale and zero point per row
        offsets = offs_n * n_groups + (kb * 128) // GROUP_SIZE
        scale = tl.load(scale_ptr + offsets, mask=n_mask, other=1.0).to(tl.float32)
        if KIND == 1:
            zero = tl.load(zero_ptr + offsets, mask=n_mask, other=0)
            multiplier = scale
        else:
            zero = tl.full(offs_n.shape, ZERO_OFFSET, tl.int32)
            multiplier = 1.0 / scale
        zeros = tl.broadcast_to(zero_pairs(zero, IS_BF16)[:, None], words.shape)
        weights = int_codes(words, zeros, DTYPE, USE_ASM)
    else:  # scale every weight: groups smaller than a step
        offsets = offs_n[:, None] * n_groups + ((kb * 128 + 8 * j) // GROUP_SIZE)[None, :]
        scale = tl.load(scale_ptr + offsets, mask=n_mask[:, None], other=1.0).to(tl.float32)
        if KIND == 1:
            zero = tl.load(zero_ptr + offsets, mask=n_mask[:, None], other=0)
            reciprocal = scale
        else:
            zero = tl.full(words.shape, ZERO_OFFSET, tl.int32)
            reciprocal = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
        codes = int_codes(words, zero_pairs(zero, IS_BF16), DTYPE, USE_ASM)
        weights = (
            _divide(codes[0].to(tl.float32), scale, reciprocal, KIND).to(DTYPE),
            _divide(codes[1].to(tl.float32), scale, reciprocal, KIND).to(DTYPE),
            _divide(codes[2].to(tl.float32), scale, reciprocal, KIND).to(DTYPE),
            _divide(codes[3].to(tl.float32), scale, reciprocal, KIND).to(DTYPE),
            _divide(codes[4].to(tl.float32), scale, reciprocal, KIND).to(DTYPE),
            _divide(codes[5].to(tl.float32), scale, reciprocal, KIND).to(DTYPE),
            _divide(codes[6].to(tl.float32), scale, reciprocal, KIND).to(DTYPE),
            _divide(codes[7].to(tl.float32), scale, reciprocal, KIND).to(DTYPE),
        )
        multiplier = tl.full(offs_n.shape, 1.0, tl.float32)
    return weights, multiplier


@triton.jit
def _write_output(acc, offs_m, offs_n, m_mask, n_mask, tile, bias_ptr, out_ptr, workspace_ptr, counter_ptr, N,
                  stride_om, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Store the float32 tile ``acc`` (BLOCK_N, BLOCK_M) (+ bias) as out[offs_m, offs_n] in out's dtype; with
    SPLIT_K > 1 add it to the workspace and let the last of the tile's SPLIT_K programs (arrival counter
    ``tile``) read the sums back, reset workspace and counter, and store."""
    out_offsets = offs_m[None, :] * stride_om + offs_n[:, None]
    mask = m_mask[None, :] & n_mask[:, None]
    if SPLIT_K > 1:
        partial_ptrs = workspace_ptr + offs_m[None, :] * N + offs_n[:, None]
        tl.atomic_add(partial_ptrs, acc, mask=mask, sem="relaxed")
        tl.debug_barrier()  # every thread's partial sums before the arrival
        arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:  # the last program of this tile: finish it, reset the workspace
            # read-and-zero in one atomic: a load then a store could meet in different thread layouts
            bits = partial_ptrs.to(tl.pointer_type(tl.int32), bitcast=True)
            acc = tl.atomic_xchg(bits, tl.zeros(acc.shape, tl.int32), mask=mask, sem="relaxed")
            acc = acc.to(tl.float32, bitcast=True)
            tl.atomic_xchg(counter_ptr + tile, 0)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
            tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M"])  # one compilation serves every row count
def _w4_matmul_kernel(
    x_ptr, words_ptr, scale_ptr, zero_ptr, global_scale_ptr, bias_ptr, out_ptr, workspace_ptr, counter_ptr,
    block_of_word_ptr,
    M, N, K, stride_xm, stride_wn, stride_om,
    KIND: tl.constexpr, GROUP_SIZE: tl.constexpr, ZERO_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
    X_PERMUTED: tl.constexpr, SCALE_AFTER_DOT: tl.constexpr, USE_ASM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT_K: tl.constexpr, UNROLL: tl.constexpr,
):
    """out (M, N) = x (M, K) @ W.T (+ bias); see the module docstring. Programs run over M tiles fastest,
    so the programs that share a weight tile run together (one HBM read)."""
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    # the interpreter (no inline PTX) multiplies the same exact values in float32: its 16-bit dot is unreliable
    OPERAND: tl.constexpr = DTYPE if USE_ASM else tl.float32
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    m_tiles = tl.cdiv(M, BLOCK_M)
    pid_m = pid % m_tiles
    pid_n = pid // m_tiles
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    j = tl.arange(0, 16)
    word_ptrs = words_ptr + offs_n[:, None] * stride_wn + j[None, :]
    # activation tile i of a step: columns 8 j + i of x, or 16 i + j of the permuted copy
    column_step: tl.constexpr = 16 if X_PERMUTED else 1
    x_ptrs = x_ptr + offs_m[None, :] * stride_xm + (j * (1 if X_PERMUTED else 8))[:, None]
    n_groups = K // GROUP_SIZE
    steps = K // (128 * SPLIT_K)
    first = pid_k * steps
    # loaded, not computed from j: Triton then keeps the weight operands' conversion before the bit tricks
    scale_index = tl.broadcast_to(tl.load(block_of_word_ptr + j)[None, :], (BLOCK_N, 16))
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for step in range(0, steps // UNROLL):
        for u in tl.static_range(UNROLL):  # UNROLL consecutive steps: 64 * UNROLL contiguous bytes of each row
            kb = first + step * UNROLL + u
            words = tl.load(word_ptrs + kb * 16, mask=n_mask[:, None], other=0)
            weights, multiplier = _operands(words, kb, offs_n, n_mask, j, scale_index, scale_ptr, zero_ptr,
                                            n_groups, KIND, GROUP_SIZE, ZERO_OFFSET, SCALE_AFTER_DOT,
                                            DTYPE == tl.bfloat16, OPERAND, USE_ASM)
            part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for i in tl.static_range(8):
                x = tl.load(x_ptrs + kb * 128 + i * column_step, mask=m_mask[None, :], other=0.0).to(OPERAND)
                part = tl.dot(weights[i], x, part)
            if SCALE_AFTER_DOT:
                acc += part * multiplier[:, None]
            else:  # a float32 add per output and step keeps ptxas from serializing the wgmma chain
                acc += part
    if KIND == 2:
        acc *= tl.load(global_scale_ptr).to(tl.float32) * E2M1_RESCALE
    _write_output(acc, offs_m, offs_n, m_mask, n_mask, pid, bias_ptr, out_ptr, workspace_ptr, counter_ptr, N,
                  stride_om, HAS_BIAS, SPLIT_K)


@triton.jit
def _w4_gemv_kernel(
    x_ptr, x_sums_ptr, words_ptr, scale_ptr, zero_ptr, global_scale_ptr, bias_ptr, out_ptr,
    workspace_ptr, counter_ptr, block_of_word_ptr, N, K, stride_wn,
    KIND: tl.constexpr, GROUP_SIZE: tl.constexpr, ZERO_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
    SCALE_AFTER_DOT: tl.constexpr, USE_ASM: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
    UNROLL: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """out (1, N) = x (1, K) @ W.T (+ bias) on the CUDA cores, for one activation row, one float32 FMA per
    weight into a (BLOCK_N, 16) accumulator summed over its 16 columns at the end. ``x_ptr``: x permuted
    to float32 (``float_activations_and_sums``: tile i of a step is 16 contiguous floats); ``x_sums_ptr``:
    float32 ``s[16 b + j] = sum_i x[128 b + 8 j + i]``, the activation sum of each word.

    Integer groups of whole steps (``SCALE_AFTER_DOT``): the float32 with exponent 4 and the code in the top
    mantissa bits is exactly ``16 + q`` (two integer instructions per weight, ``sixteen_plus_codes``), so per
    word and row ``sum_i x_i (q_i - zero) = sum_i x_i (16 + q_i) - (16 + zero) * s_j``, then times
    ``1 / scale`` (symmetric) or ``scale`` (asymmetric) per row and step. NVFP4: exact ``e2m1 / 2**14`` floats
    (``e2m1_floats``), each word's sum times its E4M3 block scale (from the step's two int32 words of scales),
    the total times ``2**14 * global_scale``. Smaller integer groups: the exact 16-bit operands of
    ``_operands``, widened."""
    DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    OPERAND: tl.constexpr = DTYPE if USE_ASM else tl.float32
    MAGIC_CODES: tl.constexpr = SCALE_AFTER_DOT and KIND != 2
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    j = tl.arange(0, 16)
    word_ptrs = words_ptr + offs_n[:, None] * stride_wn + j[None, :]
    n_groups = K // GROUP_SIZE
    steps = K // (128 * SPLIT_K)
    first = pid_k * steps
    scale_index = tl.broadcast_to(tl.load(block_of_word_ptr + j)[None, :], (BLOCK_N, 16))
    acc = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
    for step in tl.range(0, steps // UNROLL, num_stages=NUM_STAGES):
        for u in tl.static_range(UNROLL):  # UNROLL consecutive steps: 64 * UNROLL contiguous bytes of each row
            kb = first + step * UNROLL + u
            words = tl.load(word_ptrs + kb * 16, mask=n_mask[:, None], other=0)
            part = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
            if MAGIC_CODES:
                offsets = offs_n * n_groups + (kb * 128) // GROUP_SIZE
                scale = tl.load(scale_ptr + offsets, mask=n_mask, other=1.0).to(tl.float32)
                if KIND == 1:
                    offset = 16.0 + tl.load(zero_ptr + offsets, mask=n_mask, other=0).to(tl.float32)
                    multiplier = scale
                else:
                    offset = tl.full(offs_n.shape, 16.0 + ZERO_OFFSET, tl.float32)
                    multiplier = 1.0 / scale
                values = sixteen_plus_codes(words, USE_ASM)
                for i in tl.static_range(8):
                    part += values[i] * tl.load(x_ptr + kb * 128 + 16 * i + j)[None, :]
                sums = tl.load(x_sums_ptr + kb * 16 + j)
                acc += (part - offset[:, None] * sums[None, :]) * multiplier[:, None]
            elif KIND == 2:  # e2m1 / 2**14 in float32; each word's block scale (E4M3) after its 8 products
                values = e2m1_floats(words, USE_ASM)
                for i in tl.static_range(8):
                    part += values[i] * tl.load(x_ptr + kb * 128 + 16 * i + j)[None, :]
                # the step's 8 scales of a row are two int32 words (4-byte loads pipeline; bytes would not)
                scale_words = scale_ptr + offs_n * (n_groups // 4) + kb * 2
                low = tl.load(scale_words, mask=n_mask, other=0)[:, None]
                high = tl.load(scale_words + 1, mask=n_mask, other=0)[:, None]
                byte = (tl.where(scale_index < 4, low, high) >> (8 * (scale_index % 4))) & 0xFF
                acc += part * byte.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
            else:
                weights, multiplier = _operands(words, kb, offs_n, n_mask, j, scale_index, scale_ptr, zero_ptr,
                                                n_groups, KIND, GROUP_SIZE, ZERO_OFFSET, SCALE_AFTER_DOT,
                                                DTYPE == tl.bfloat16, OPERAND, USE_ASM)
                for i in tl.static_range(8):
                    part += weights[i].to(tl.float32) * tl.load(x_ptr + kb * 128 + 16 * i + j)[None, :]
                acc += part
    if KIND == 2:
        acc *= tl.load(global_scale_ptr).to(tl.float32) * E2M1_FLOAT_SCALE
    offs_m = tl.arange(0, 1)
    _write_output(tl.sum(acc, axis=1)[:, None], offs_m, offs_n, offs_m < 1, n_mask, pid_n, bias_ptr, out_ptr,
                  workspace_ptr, counter_ptr, N, 0, HAS_BIAS, SPLIT_K)


@triton.jit
def _permute_kernel(x_ptr, out_ptr, sums_ptr, M, K, stride_xm, BLOCK_M: tl.constexpr, WITH_SUMS: tl.constexpr):
    """out[m, 128 b + 16 i + j] = x[m, 128 b + 8 j + i] (in out's dtype): the column order of the weight tiles;
    ``WITH_SUMS``: also sums[m, 16 b + j] = sum_i x[m, 128 b + 8 j + i] in float32."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * 128
    j = tl.arange(0, 16)
    i = tl.arange(0, 8)
    mask = (offs_m < M)[:, None, None]
    x = tl.load(x_ptr + offs_m[:, None, None] * stride_xm + k0 + 8 * j[None, :, None] + i[None, None, :], mask=mask)
    out_ptrs = out_ptr + offs_m[:, None, None] * K + k0 + 16 * i[None, None, :] + j[None, :, None]
    tl.store(out_ptrs, x.to(out_ptr.dtype.element_ty), mask=mask)
    if WITH_SUMS:
        sums_ptrs = sums_ptr + offs_m[:, None] * (K // 8) + k0 // 8 + j[None, :]
        tl.store(sums_ptrs, tl.sum(x.to(tl.float32), axis=2), mask=(offs_m < M)[:, None])


# ---- bit-exact dequantization (dequantize-then-cuBLAS) ---------------------------------------------------


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
        w = _divide(value - zero, scale[:, :, None], reciprocal[:, :, None], KIND)
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


# ---- launch --------------------------------------------------------------------------------------------


def use_inline_asm() -> bool:
    """Inline PTX, except under Triton's CPU interpreter (which cannot run it)."""
    return os.environ.get("TRITON_INTERPRET", "0") != "1"


def _check_config(config: dict, keys: tuple[str, ...]) -> None:
    unknown = sorted(set(config) - set(keys))
    if unknown:
        raise ValueError(f"config keys {unknown}: allowed are {list(keys)}")


def _check_split(k: int, split_k: int, unroll: int, unroll_key: str = "UNROLL") -> None:
    """K / 128 steps split SPLIT_K ways, each program's steps in groups of ``unroll``."""
    if (k // BLOCK_K) % split_k:
        raise ValueError(f"config SPLIT_K={split_k} must divide K / {BLOCK_K} = {k // BLOCK_K}")
    if (k // BLOCK_K // split_k) % unroll:
        raise ValueError(f"config {unroll_key}={unroll} must divide the {k // BLOCK_K // split_k} steps of "
                         f"{BLOCK_K} per program (K={k}, SPLIT_K={split_k})")


def _largest_unroll(steps: int, wanted: int) -> int:
    """The largest power of two <= ``wanted`` that divides ``steps``."""
    unroll = wanted
    while steps % unroll:
        unroll //= 2
    return unroll


def default_config(m: int, n: int, k: int, group_size: int) -> dict:
    """Launch configuration for an (M, K) x (N, K) product (bench/results/kernels_h100_notes.md; H100).

    Up to 64 rows: weight tiles of 128 rows, activation columns permuted first (their tiles then stream
    through the same pipelined copies as the codes), split-K until the grid has about twelve programs per
    multiprocessor up to 16 rows (8192 x 28672: SPLIT_K 8, the fastest measured) and two from 17 rows, each
    program keeping at least 4 steps of 128. More rows: 128 x 128 tiles (``dispatch`` prefers dequantize +
    cuBLAS).
    """
    after_dot = group_size % BLOCK_K == 0
    if m > 64:
        return dict(BLOCK_N=128, BLOCK_M=128, SPLIT_K=1, UNROLL=1, num_warps=8, num_stages=3, X_PERMUTED=True,
                    SCALE_AFTER_DOT=after_dot)
    k_blocks = k // BLOCK_K
    split_k = _split_k(triton.cdiv(n, 128), k_blocks, (12 if m <= 16 else 2) * MULTIPROCESSORS)
    return dict(BLOCK_N=128, BLOCK_M=max(16, triton.next_power_of_2(m)), SPLIT_K=split_k, UNROLL=1, num_warps=4,
                num_stages=3, X_PERMUTED=True, SCALE_AFTER_DOT=after_dot)


def _split_k(tiles: int, k_blocks: int, programs: int, step_multiple: int = 1) -> int:
    """Powers of two of split-K until ``tiles * split_k >= programs``, keeping >= 4 steps per program and a
    multiple of ``step_multiple``."""
    split_k = 1
    while tiles * split_k < programs and k_blocks % (2 * split_k * step_multiple) == 0 and \
            k_blocks // (2 * split_k) >= 4:
        split_k *= 2
    return split_k


_BUFFERS: dict = {}


def _scratch(device: torch.device, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A zeroed buffer of at least ``numel`` elements, cached per device (the kernels leave it zeroed)."""
    key = (device, name)
    buffer = _BUFFERS.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = torch.zeros(max(numel, 1024), device=device, dtype=dtype)
        _BUFFERS[key] = buffer
    return buffer


def _block_of_word(device: torch.device) -> torch.Tensor:
    """int32 [16]: the NVFP4 block (of 16 codes) of each word in a 128-wide step, j // 2."""
    key = (device, "block_of_word")
    if key not in _BUFFERS:
        _BUFFERS[key] = torch.arange(16, device=device, dtype=torch.int32) // 2
    return _BUFFERS[key]


def permute_activations(x: torch.Tensor) -> torch.Tensor:
    """Contiguous copy of x (M, K) with columns ``128 b + 8 j + i`` moved to ``128 b + 16 i + j``."""
    m, k = x.shape
    out = torch.empty((m, k), device=x.device, dtype=x.dtype)
    block_m = 16
    _permute_kernel[(triton.cdiv(m, block_m), k // BLOCK_K)](x, out, out, m, k, x.stride(0), BLOCK_M=block_m,
                                                            WITH_SUMS=False)
    return out


def float_activations_and_sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(``permute_activations(x)`` in float32 (exact), float32 (M, K // 8) sums of each 8 consecutive columns of
    x): the activation operands of ``w4_gemv``."""
    m, k = x.shape
    out = torch.empty((m, k), device=x.device, dtype=torch.float32)
    sums = torch.empty((m, k // 8), device=x.device, dtype=torch.float32)
    block_m = triton.next_power_of_2(min(m, 16))
    _permute_kernel[(triton.cdiv(m, block_m), k // BLOCK_K)](x, out, sums, m, k, x.stride(0), BLOCK_M=block_m,
                                                            WITH_SUMS=True)
    return out, sums


def w4_matmul(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    kind: str,
    group_size: int,
    zero_point: torch.Tensor | None = None,
    global_scale: torch.Tensor | None = None,
    zero_offset: int = 0,
    bias: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """``x (M, K) @ dequantize(codes, ...).T + bias`` -> (M, N) in x's dtype (bf16 or fp16).

    ``codes`` uint8 (N, K // 2); ``scale`` (N, K // group_size) (float, or float8_e4m3fn for NVFP4, group 16);
    ``zero_point`` uint8 like ``scale`` for ``kind="int_affine"``; ``global_scale`` a float32 scalar tensor for
    ``"nvfp4"``; ``zero_offset`` the code offset of ``"int_divide"`` (8 for signed INT4). ``config``: keys
    ``CONFIG_KEYS`` (default: ``default_config``). The caller checks shapes and dtypes
    (``lowbit.kernels.dispatch``): K a multiple of 128, group_size a power of two >= 16.
    """
    m, k = x.shape
    n = codes.shape[0]
    _check_config(config or {}, CONFIG_KEYS)
    launch = {**default_config(m, n, k, group_size), **(config or {})}
    if launch["SCALE_AFTER_DOT"] and (kind == "nvfp4" or group_size % BLOCK_K):
        raise ValueError(f"config SCALE_AFTER_DOT=True needs integer groups of a multiple of {BLOCK_K}, "
                         f"got kind={kind!r} group_size={group_size}")
    split_k = launch["SPLIT_K"]
    _check_split(k, split_k, launch["UNROLL"])
    x = x.contiguous() if x.stride(-1) != 1 else x
    if launch["X_PERMUTED"]:
        x = permute_activations(x)
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    tiles = triton.cdiv(m, launch["BLOCK_M"]) * triton.cdiv(n, launch["BLOCK_N"])
    workspace = _scratch(x.device, "partials", m * n if split_k > 1 else 1, torch.float32)
    counters = _scratch(x.device, "counters", tiles if split_k > 1 else 1, torch.int32)
    words = codes.view(torch.int32)
    scale_arg = scale.view(torch.int32) if kind == "nvfp4" else scale
    grid = (tiles, split_k)
    _w4_matmul_kernel[grid](
        x, words, scale_arg, zero_point if zero_point is not None else scale_arg,
        global_scale if global_scale is not None else scale_arg, bias if bias is not None else x,
        out, workspace, counters, _block_of_word(x.device), m, n, k, x.stride(0), words.stride(0), out.stride(0),
        KIND=KINDS[kind], GROUP_SIZE=group_size, ZERO_OFFSET=int(zero_offset), HAS_BIAS=bias is not None,
        X_PERMUTED=launch["X_PERMUTED"], SCALE_AFTER_DOT=launch["SCALE_AFTER_DOT"], USE_ASM=use_inline_asm(),
        BLOCK_N=launch["BLOCK_N"], BLOCK_M=launch["BLOCK_M"], SPLIT_K=split_k, UNROLL=launch["UNROLL"],
        num_warps=launch["num_warps"], num_stages=launch["num_stages"],
    )
    return out


def default_gemv_config(n: int, k: int) -> dict:
    """Launch configuration of ``w4_gemv`` (bench/results/kernels_h100_notes.md; H100): 64-row tiles, 4 warps,
    4 steps (256 contiguous bytes of each weight row; 2 where the steps per program are not a multiple of 4)
    per loop iteration, 3 pipeline stages, split-K until about four programs per multiprocessor (8192 x 28672:
    SPLIT_K 2, the fastest measured)."""
    k_blocks = k // BLOCK_K
    split_k = _split_k(triton.cdiv(n, 64), k_blocks, 4 * MULTIPROCESSORS, step_multiple=2)
    return dict(BLOCK_N=64, SPLIT_K=split_k, UNROLL=_largest_unroll(k_blocks // split_k, 4), num_warps=4,
                num_stages=3)


GEMV_MIN_STEPS = 32  # steps of 128 per program under default_gemv_config from which w4_gemv beats w4_matmul


def prefers_gemv(n: int, k: int) -> bool:
    """Whether ``w4_gemv`` is the faster kernel for one row of an (N, K) weight on H100: only with long K ranges
    per program (bench/results/kernels_h100_notes.md: 8192 x 28672, 32 steps, 77.9 us against 82.2 us of
    ``w4_matmul``; with 4-14 steps, on the smaller shapes, it lost by up to 17%)."""
    return k // BLOCK_K // default_gemv_config(n, k)["SPLIT_K"] >= GEMV_MIN_STEPS


def w4_gemv(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    kind: str,
    group_size: int,
    zero_point: torch.Tensor | None = None,
    global_scale: torch.Tensor | None = None,
    zero_offset: int = 0,
    bias: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """``w4_matmul`` for one activation row (x (1, K)) on the CUDA cores (``_w4_gemv_kernel``); same arguments,
    ``config`` keys ``GEMV_CONFIG_KEYS`` (default ``default_gemv_config``)."""
    m, k = x.shape
    if m != 1:
        raise ValueError(f"w4_gemv takes one activation row, got x of shape {tuple(x.shape)}")
    n = codes.shape[0]
    _check_config(config or {}, GEMV_CONFIG_KEYS)
    after_dot = kind != "nvfp4" and group_size % BLOCK_K == 0
    launch = {**default_gemv_config(n, k), **(config or {})}
    split_k = launch["SPLIT_K"]
    if "UNROLL" not in (config or {}):  # per-weight scales (small integer groups) need the registers: no unrolling
        launch["UNROLL"] = _largest_unroll(k // BLOCK_K // split_k, 4 if after_dot or kind == "nvfp4" else 1)
    _check_split(k, split_k, launch["UNROLL"])
    x_float, x_sums = float_activations_and_sums(x if x.stride(-1) == 1 else x.contiguous())
    out = torch.empty((1, n), device=x.device, dtype=x.dtype)
    tiles = triton.cdiv(n, launch["BLOCK_N"])
    workspace = _scratch(x.device, "partials", n if split_k > 1 else 1, torch.float32)
    counters = _scratch(x.device, "counters", tiles if split_k > 1 else 1, torch.int32)
    words = codes.view(torch.int32)
    scale_arg = scale.view(torch.int32) if kind == "nvfp4" else scale
    _w4_gemv_kernel[(tiles, split_k)](
        x_float, x_sums, words, scale_arg, zero_point if zero_point is not None else scale_arg,
        global_scale if global_scale is not None else scale_arg, bias if bias is not None else x,
        out, workspace, counters, _block_of_word(x.device), n, k, words.stride(0),
        KIND=KINDS[kind], GROUP_SIZE=group_size, ZERO_OFFSET=int(zero_offset), HAS_BIAS=bias is not None,
        SCALE_AFTER_DOT=after_dot, USE_ASM=use_inline_asm(), BLOCK_N=launch["BLOCK_N"], SPLIT_K=split_k,
        UNROLL=launch["UNROLL"], NUM_STAGES=launch["num_stages"], num_warps=launch["num_warps"],
    )
    return out


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
    _check_config(config or {}, DEQUANTIZE_CONFIG_KEYS)
    n, k = codes.shape[0], codes.shape[1] * 2
    launch = {"BLOCK_N": 32, "K_BLOCKS": 1, "num_warps": 4, **(config or {})}
    _check_split(k, 1, launch["K_BLOCKS"], "K_BLOCKS")
    out = torch.empty((n, k), device=codes.device, dtype=dtype)
    _w4_dequantize_kernel[(triton.cdiv(n, launch["BLOCK_N"]), k // BLOCK_K // launch["K_BLOCKS"])](
        codes.view(torch.int32), scale, zero_point if zero_point is not None else scale,
        global_scale if global_scale is not None else scale, out, n, k,
        KIND=KINDS[kind], GROUP_SIZE=group_size, ZERO_OFFSET=int(zero_offset), BLOCK_N=launch["BLOCK_N"],
        K_BLOCKS=launch["K_BLOCKS"], num_warps=launch["num_warps"],
    )
    return out
