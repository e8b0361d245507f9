"""Triton W4A16 product on the tensor cores: ``out = x @ dequantize(W).T (+ bias)`` for any number of rows.

Per output row n and K step of 128 (16 words): the exact 16-bit operands of ``w4_shared.step_operands`` as eight
(BLOCK_N, 16) tiles, tile i for K = {8 j + i}; their products with the matching activation columns on the tensor
cores (``tl.dot``, weights as the first operand, so that BLOCK_N >= 64 rows fill the wgmma M dimension even for
one activation row), accumulated in float32; the group scale: integer formats whose groups are whole steps (128,
256, ..., per channel) multiply the step's float32 sum by ``1 / scale`` (symmetric, ModelOpt's ``w = q /
scale``) or ``scale`` (asymmetric) once per row and step (``SCALE_AFTER_DOT``); smaller groups scale each
weight before the dot; NVFP4 multiplies the whole sum by ``128 * global_scale`` at the end.

So the weights are never approximated: the only roundings are float32 accumulation and the output's.
Activation columns {8 j + i} are gathered (stride 8), or read from a copy of x permuted once
(``X_PERMUTED``, the default): their tiles are then contiguous and stream through the same pipelined
asynchronous copies as the codes, instead of a shared-memory store and barrier per tile. ``UNROLL``:
consecutive steps per loop iteration (64 * UNROLL contiguous bytes of every weight row at a time). Split-K
(``SPLIT_K`` > 1): see ``w4_shared.write_output``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from lowbit.kernels.nibbles import E2M1_RESCALE
from lowbit.kernels.w4_shared import (
    BLOCK_K,
    KINDS,
    MULTIPROCESSORS,
    block_of_word,
    check_config,
    check_split,
    permute_activations,
    scratch,
    split_k_for,
    step_operands,
    use_inline_asm,
    write_output,
)

CONFIG_KEYS = ("BLOCK_N", "BLOCK_M", "SPLIT_K", "UNROLL", "num_warps", "num_stages", "X_PERMUTED",
               "SCALE_AFTER_DOT")


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
            weights, multiplier = step_operands(words, kb, offs_n, n_mask, j, scale_index, scale_ptr, zero_ptr,
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
    write_output(acc, offs_m, offs_n, m_mask, n_mask, pid, bias_ptr, out_ptr, workspace_ptr, counter_ptr, N,
                  stride_om, HAS_BIAS, SPLIT_K)


@functools.cache  # a pure function of the shape, asked on every call
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
    split_k = split_k_for(triton.cdiv(n, 128), k_blocks, (12 if m <= 16 else 2) * MULTIPROCESSORS)
    return dict(BLOCK_N=128, BLOCK_M=max(16, triton.next_power_of_2(m)), SPLIT_K=split_k, UNROLL=1, num_warps=4,
                num_stages=3, X_PERMUTED=True, SCALE_AFTER_DOT=after_dot)


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
    check_config(config or {}, CONFIG_KEYS)
    launch = {**default_config(m, n, k, group_size), **(config or {})}
    if launch["SCALE_AFTER_DOT"] and (kind == "nvfp4" or group_size % BLOCK_K):
        raise ValueError(f"config SCALE_AFTER_DOT=True needs integer groups of a multiple of {BLOCK_K}, "
                         f"got kind={kind!r} group_size={group_size}")
    split_k = launch["SPLIT_K"]
    check_split(k, split_k, launch["UNROLL"])
    x = x.contiguous() if x.stride(-1) != 1 else x
    if launch["X_PERMUTED"]:
        x = permute_activations(x)
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    tiles = triton.cdiv(m, launch["BLOCK_M"]) * triton.cdiv(n, launch["BLOCK_N"])
    workspace = scratch(x.device, "partials", m * n if split_k > 1 else 1, torch.float32)
    counters = scratch(x.device, "counters", tiles if split_k > 1 else 1, torch.int32)
    words = codes.view(torch.int32)
    scale_arg = scale.view(torch.int32) if kind == "nvfp4" else scale
    grid = (tiles, split_k)
    _w4_matmul_kernel[grid](
        x, words, scale_arg, zero_point if zero_point is not None else scale_arg,
        global_scale if global_scale is not None else scale_arg, bias if bias is not None else x,
        out, workspace, counters, block_of_word(x.device), m, n, k, x.stride(0), words.stride(0), out.stride(0),
        KIND=KINDS[kind], GROUP_SIZE=group_size, ZERO_OFFSET=int(zero_offset), HAS_BIAS=bias is not None,
        X_PERMUTED=launch["X_PERMUTED"], SCALE_AFTER_DOT=launch["SCALE_AFTER_DOT"], USE_ASM=use_inline_asm(),
        BLOCK_N=launch["BLOCK_N"], BLOCK_M=launch["BLOCK_M"], SPLIT_K=split_k, UNROLL=launch["UNROLL"],
        num_warps=launch["num_warps"], num_stages=launch["num_stages"],
    )
    return out
