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

``w4_dequantize`` writes the dequantized (N, K) weight bit-exactly (for dequantize-then-cuBLAS).
This module imports triton at import time; ``lowbit.kernels.dispatch`` imports it only on CUDA.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from lowbit.kernels.nibbles import E2M1_RESCALE, e2m1_codes, int_codes, zero_pairs

INT_DIVIDE, INT_AFFINE, NVFP4 = 0, 1, 2
KINDS = {"int_divide": INT_DIVIDE, "int_affine": INT_AFFINE, "nvfp4": NVFP4}
BLOCK_K = 128  # K elements per step: 16 int32 words of codes
CONFIG_KEYS = ("BLOCK_N", "BLOCK_M", "SPLIT_K", "num_warps", "num_stages", "X_PERMUTED", "SCALE_AFTER_DOT")


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
def _w4_matmul_kernel(
    x_ptr, words_ptr, scale_ptr, zero_ptr, global_scale_ptr, bias_ptr, out_ptr, workspace_ptr, counter_ptr,
    block_of_word_ptr,
    M, N, K, stride_xm, stride_wn, stride_om,
    KIND: tl.constexpr, GROUP_SIZE: tl.constexpr, ZERO_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
    X_PERMUTED: tl.constexpr, SCALE_AFTER_DOT: tl.constexpr, USE_ASM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT_K: tl.constexpr,
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
    for step in range(0, steps):
        kb = first + step
        words = tl.load(word_ptrs + kb * 16, mask=n_mask[:, None], other=0)
        weights, multiplier = _operands(words, kb, offs_n, n_mask, j, scale_index, scale_ptr, zero_ptr, n_groups,
                                        KIND, GROUP_SIZE,
                                        ZERO_OFFSET, SCALE_AFTER_DOT, DTYPE == tl.bfloat16, OPERAND, USE_ASM)
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
    out_offsets = offs_m[None, :] * stride_om + offs_n[:, None]
    mask = m_mask[None, :] & n_mask[:, None]
    if SPLIT_K > 1:
        partial_ptrs = workspace_ptr + offs_m[None, :] * N + offs_n[:, None]
        tl.atomic_add(partial_ptrs, acc, mask=mask, sem="relaxed")
        tl.debug_barrier()  # every thread's partial sums before the arrival
        arrived = tl.atomic_add(counter_ptr + pid, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:  # the last program of this tile: finish it, reset the workspace
            # read-and-zero in one atomic: a load then a store could meet in different thread layouts
            bits = partial_ptrs.to(tl.pointer_type(tl.int32), bitcast=True)
            acc = tl.atomic_xchg(bits, tl.zeros(acc.shape, tl.int32), mask=mask, sem="relaxed")
            acc = acc.to(tl.float32, bitcast=True)
            tl.atomic_xchg(counter_ptr + pid, 0)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
            tl.store(out_ptr + out_offsets, acc.to(DTYPE), mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + out_offsets, acc.to(DTYPE), mask=mask)


@triton.jit
def _permute_kernel(x_ptr, out_ptr, M, K, stride_xm, BLOCK_M: tl.constexpr):
    """out[m, 128 b + 16 i + j] = x[m, 128 b + 8 j + i]: the column order of the weight tiles."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * 128
    j = tl.arange(0, 16)
    i = tl.arange(0, 8)
    mask = (offs_m < M)[:, None, None]
    x = tl.load(x_ptr + offs_m[:, None, None] * stride_xm + k0 + 8 * j[None, :, None] + i[None, None, :], mask=mask)
    out_ptrs = out_ptr + offs_m[:, None, None] * K + k0 + 16 * i[None, None, :] + j[None, :, None]
    tl.store(out_ptrs, x, mask=mask)


# ---- bit-exact dequantization (dequantize-then-cuBLAS) ---------------------------------------------------


@triton.jit
def _w4_dequantize_kernel(
    words_ptr, scale_ptr, zero_ptr, global_scale_ptr, out_ptr, N, K,
    KIND: tl.constexpr, GROUP_SIZE: tl.constexpr, ZERO_OFFSET: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out (N, K) = lowbit.formats' dequantized weights in out's dtype, one 128-wide K block per program:
    float32 ``(code - zero) / scale`` (correctly rounded), ``(code - zero) * scale`` or
    ``e2m1 * (block_scale * global_scale)``, rounded once to out's dtype."""
    GROUP: tl.constexpr = GROUP_SIZE if GROUP_SIZE < 128 else 128  # K elements of one scale within the block
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    kb = tl.program_id(1)
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


# ---- launch --------------------------------------------------------------------------------------------


def use_inline_asm() -> bool:
    """Inline PTX, except under Triton's CPU interpreter (which cannot run it)."""
    return os.environ.get("TRITON_INTERPRET", "0") != "1"


def default_config(m: int, n: int, k: int, group_size: int) -> dict:
    """Launch configuration for an (M, K) x (N, K) product (bench/results/kernels_h100_notes.md; H100).

    Up to 64 rows: weight tiles of 256 (128 from 17 rows) rows, activation columns permuted first (their
    tiles then stream through the same pipelined copies as the codes), split-K until the grid has about
    two programs per multiprocessor. More rows: 128 x 128 tiles (``dispatch`` prefers dequantize + cuBLAS).
    """
    after_dot = group_size % BLOCK_K == 0
    if m > 64:
        return dict(BLOCK_N=128, BLOCK_M=128, SPLIT_K=1, num_warps=8, num_stages=3, X_PERMUTED=True,
                    SCALE_AFTER_DOT=after_dot)
    block_n = 256 if m <= 16 else 128
    k_blocks = k // BLOCK_K
    programs = triton.cdiv(n, block_n)
    split_k = 1
    while programs * split_k < 2 * 132 and k_blocks % (2 * split_k) == 0 and k_blocks // (2 * split_k) >= 4:
        split_k *= 2
    return dict(BLOCK_N=block_n, BLOCK_M=max(16, triton.next_power_of_2(m)), SPLIT_K=split_k, num_warps=4,
                num_stages=3, X_PERMUTED=True, SCALE_AFTER_DOT=after_dot)


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
    _permute_kernel[(triton.cdiv(m, block_m), k // BLOCK_K)](x, out, m, k, x.stride(0), BLOCK_M=block_m)
    return out


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
    unknown = sorted(set(config or {}) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"config keys {unknown}: allowed are {list(CONFIG_KEYS)}")
    launch = {**default_config(m, n, k, group_size), **(config or {})}
    if launch["SCALE_AFTER_DOT"] and (kind == "nvfp4" or group_size % BLOCK_K):
        raise ValueError(f"config SCALE_AFTER_DOT=True needs integer groups of a multiple of {BLOCK_K}, "
                         f"got kind={kind!r} group_size={group_size}")
    split_k = launch["SPLIT_K"]
    if (k // BLOCK_K) % split_k:
        raise ValueError(f"config SPLIT_K={split_k} must divide K / {BLOCK_K} = {k // BLOCK_K}")
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
        BLOCK_N=launch["BLOCK_N"], BLOCK_M=launch["BLOCK_M"], SPLIT_K=split_k,
        num_warps=launch["num_warps"], num_stages=launch["num_stages"],
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
) -> torch.Tensor:
    """Dequantized weights (N, K) in ``dtype``, equal to lowbit.formats' dequantization bit for bit."""
    n, k = codes.shape[0], codes.shape[1] * 2
    out = torch.empty((n, k), device=codes.device, dtype=dtype)
    block_n = 32
    _w4_dequantize_kernel[(triton.cdiv(n, block_n), k // BLOCK_K)](
        codes.view(torch.int32), scale, zero_point if zero_point is not None else scale,
        global_scale if global_scale is not None else scale, out, n, k,
        KIND=KINDS[kind], GROUP_SIZE=group_size, ZERO_OFFSET=int(zero_offset), BLOCK_N=block_n,
    )
    return out
