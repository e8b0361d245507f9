"""Triton W4A16 product for one activation row on the CUDA cores: ``out (1, N) = x (1, K) @ dequantize(W).T``.

One float32 FMA per weight (``_w4_gemv_kernel``); ``prefers_gemv`` says for which weight shapes it measured
faster than ``w4_matmul``. ``UNROLL``: consecutive steps of 128 per loop iteration, so each program reads
64 * UNROLL contiguous bytes of every weight row at a time; split-K as in ``w4_shared.write_output``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from lowbit.kernels.nibbles import E2M1_FLOAT_SCALE, e2m1_floats, sixteen_plus_codes
from lowbit.kernels.w4_shared import (
    BLOCK_K,
    KINDS,
    MULTIPROCESSORS,
    block_of_word,
    check_config,
    check_split,
    float_activations_and_sums,
    largest_unroll,
    scratch,
    split_k_for,
    step_operands,
    use_inline_asm,
    write_output,
)

GEMV_CONFIG_KEYS = ("BLOCK_N", "SPLIT_K", "UNROLL", "num_warps", "num_stages")


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
    ``step_operands``, widened."""
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
                weights, multiplier = step_operands(words, kb, offs_n, n_mask, j, scale_index, scale_ptr, zero_ptr,
                                                n_groups, KIND, GROUP_SIZE, ZERO_OFFSET, SCALE_AFTER_DOT,
                                                DTYPE == tl.bfloat16, OPERAND, USE_ASM)
                for i in tl.static_range(8):
                    part += weights[i].to(tl.float32) * tl.load(x_ptr + kb * 128 + 16 * i + j)[None, :]
                acc += part
    if KIND == 2:
        acc *= tl.load(global_scale_ptr).to(tl.float32) * E2M1_FLOAT_SCALE
    offs_m = tl.arange(0, 1)
    write_output(tl.sum(acc, axis=1)[:, None], offs_m, offs_n, offs_m < 1, n_mask, pid_n, bias_ptr, out_ptr,
                  workspace_ptr, counter_ptr, N, 0, HAS_BIAS, SPLIT_K)


@functools.cache  # a pure function of the shape, asked on every call
def default_gemv_config(n: int, k: int) -> dict:
    """Launch configuration of ``w4_gemv`` (bench/results/kernels_h100_notes.md; H100): 64-row tiles, 4 warps,
    4 steps (256 contiguous bytes of each weight row; 2 where the steps per program are not a multiple of 4)
    per loop iteration, 3 pipeline stages, split-K until about four programs per multiprocessor (8192 x 28672:
    SPLIT_K 2, the fastest measured)."""
    k_blocks = k // BLOCK_K
    split_k = split_k_for(triton.cdiv(n, 64), k_blocks, 4 * MULTIPROCESSORS, step_multiple=2)
    return dict(BLOCK_N=64, SPLIT_K=split_k, UNROLL=largest_unroll(k_blocks // split_k, 4), num_warps=4,
                num_stages=3)


GEMV_MIN_STEPS = 32  # steps of 128 per program under default_gemv_config from which w4_gemv beats w4_matmul


@functools.cache  # a pure function of the shape, asked on every call
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
    check_config(config or {}, GEMV_CONFIG_KEYS)
    after_dot = kind != "nvfp4" and group_size % BLOCK_K == 0
    launch = {**default_gemv_config(n, k), **(config or {})}
    split_k = launch["SPLIT_K"]
    if "UNROLL" not in (config or {}):  # per-weight scales (small integer groups) need the registers: no unrolling
        launch["UNROLL"] = largest_unroll(k // BLOCK_K // split_k, 4 if after_dot or kind == "nvfp4" else 1)
    check_split(k, split_k, launch["UNROLL"])
    x_float, x_sums = float_activations_and_sums(x if x.stride(-1) == 1 else x.contiguous())
    out = torch.empty((1, n), device=x.device, dtype=x.dtype)
    tiles = triton.cdiv(n, launch["BLOCK_N"])
    workspace = scratch(x.device, "partials", n if split_k > 1 else 1, torch.float32)
    counters = scratch(x.device, "counters", tiles if split_k > 1 else 1, torch.int32)
    words = codes.view(torch.int32)
    scale_arg = scale.view(torch.int32) if kind == "nvfp4" else scale
    _w4_gemv_kernel[(tiles, split_k)](
        x_float, x_sums, words, scale_arg, zero_point if zero_point is not None else scale_arg,
        global_scale if global_scale is not None else scale_arg, bias if bias is not None else x,
        out, workspace, counters, block_of_word(x.device), n, k, words.stride(0),
        KIND=KINDS[kind], GROUP_SIZE=group_size, ZERO_OFFSET=int(zero_offset), HAS_BIAS=bias is not None,
        SCALE_AFTER_DOT=after_dot, USE_ASM=use_inline_asm(), BLOCK_N=launch["BLOCK_N"], SPLIT_K=split_k,
        UNROLL=launch["UNROLL"], NUM_STAGES=launch["num_stages"], num_warps=launch["num_warps"],
    )
    return out
