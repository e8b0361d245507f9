"""What lowbit's Triton W4A16 kernels share (``w4_matmul``, ``w4_gemv``, ``w4_dequantize``, one file each).

Weight storage (``lowbit.compress.packing``): ``codes`` uint8 (N, K // 2), two 4-bit codes per byte along
K, low nibble first, read by the kernels as int32 words of 8 codes (decoded by ``lowbit.kernels.nibbles``);
one scale per ``group_size`` K elements of a row. The kernels walk K in steps of ``BLOCK_K`` = 128 (16 words).

Here: the exact 16-bit weight operands of a step (``step_operands``: ``code - zero`` for integers, ``e2m1 *
block_scale / 128`` for NVFP4, or each weight scaled in float32 and rounded once where groups are smaller than
a step, ``q / scale`` correctly rounded by ``divide``); the output epilogue with its split-K reduction
(``write_output``: each program adds its float32 partial tile to a workspace with atomics; the last program of a
tile, by a per-tile arrival counter, takes the sums with an atomic exchange against 0, which also resets the
workspace for the next call, resets the counter and writes the output; workspace and counters are cached per
device, so calls on one device must not overlap on different streams); the activation permutation (columns
``128 b + 8 j + i`` to ``128 b + 16 i + j``, the order of the weight tiles); and the launch checks.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from lowbit.kernels.nibbles import e2m1_codes, int_codes, zero_pairs

INT_DIVIDE, INT_AFFINE, NVFP4 = 0, 1, 2
KINDS = {"int_divide": INT_DIVIDE, "int_affine": INT_AFFINE, "nvfp4": NVFP4}
BLOCK_K = 128  # K elements per step: 16 int32 words of codes
MULTIPROCESSORS = 132  # H100 SXM: the launch defaults aim at a number of programs per multiprocessor


@triton.jit
def divide(q, scale, reciprocal, KIND: tl.constexpr):
    """Float32 weights of exact codes ``q``: ``q / scale`` correctly rounded (one Markstein correction of
    ``q * reciprocal``, ``reciprocal`` = 1 / scale correctly rounded) or ``q * scale`` (asymmetric)."""
    if KIND == 0:
        y = q * reciprocal
        w = tl.fma(tl.fma(-y, scale, q), reciprocal, y)
    else:
        w = q * scale
    return w


@triton.jit
def step_operands(words, kb, offs_n, n_mask, j, scale_index, scale_ptr, zero_ptr, n_groups,
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
            divide(codes[0].to(tl.float32), scale, reciprocal, KIND).to(DTYPE),
            divide(codes[1].to(tl.float32), scale, reciprocal, KIND).to(DTYPE),
            divide(codes[2].to(tl.float32), scale, reciprocal, KIND).to(DTYPE),
            divide(codes[3].to(tl.float32), scale, reciprocal, KIND).to(DTYPE),
            divide(codes[4].to(tl.float32), scale, reciprocal, KIND).to(DTYPE),
            divide(codes[5].to(tl.float32), scale, reciprocal, KIND).to(DTYPE),
            divide(codes[6].to(tl.float32), scale, reciprocal, KIND).to(DTYPE),
            divide(codes[7].to(tl.float32), scale, reciprocal, KIND).to(DTYPE),
        )
        multiplier = tl.full(offs_n.shape, 1.0, tl.float32)
    return weights, multiplier


@triton.jit
def write_output(acc, offs_m, offs_n, m_mask, n_mask, tile, bias_ptr, out_ptr, workspace_ptr, counter_ptr, N,
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


def use_inline_asm() -> bool:
    """Inline PTX, except under Triton's CPU interpreter (which cannot run it)."""
    return os.environ.get("TRITON_INTERPRET", "0") != "1"


def check_config(config: dict, keys: tuple[str, ...]) -> None:
    unknown = sorted(set(config) - set(keys))
    if unknown:
        raise ValueError(f"config keys {unknown}: allowed are {list(keys)}")


def check_split(k: int, split_k: int, unroll: int, unroll_key: str = "UNROLL") -> None:
    """K / 128 steps split SPLIT_K ways, each program's steps in groups of ``unroll``."""
    if (k // BLOCK_K) % split_k:
        raise ValueError(f"config SPLIT_K={split_k} must divide K / {BLOCK_K} = {k // BLOCK_K}")
    if (k // BLOCK_K // split_k) % unroll:
        raise ValueError(f"config {unroll_key}={unroll} must divide the {k // BLOCK_K // split_k} steps of "
                         f"{BLOCK_K} per program (K={k}, SPLIT_K={split_k})")


def largest_unroll(steps: int, wanted: int) -> int:
    """The largest power of two <= ``wanted`` that divides ``steps``."""
    unroll = wanted
    while steps % unroll:
        unroll //= 2
    return unroll


def split_k_for(tiles: int, k_blocks: int, programs: int, step_multiple: int = 1) -> int:
    """Powers of two of split-K until ``tiles * split_k >= programs``, keeping >= 4 steps per program and a
    multiple of ``step_multiple``."""
    split_k = 1
    while tiles * split_k < programs and k_blocks % (2 * split_k * step_multiple) == 0 and \
            k_blocks // (2 * split_k) >= 4:
        split_k *= 2
    return split_k


_BUFFERS: dict = {}
_REPLACED: list = []  # outgrown scratch buffers, never freed: CUDA graphs captured with one still use its address


def scratch(device: torch.device, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A zeroed buffer of at least ``numel`` elements, cached per device (the kernels leave it zeroed). A buffer
    outgrown by a larger call is kept alive, not freed (``lowbit.kernels.eager_graphs`` replays kernels reading it)."""
    key = (device, name)
    buffer = _BUFFERS.get(key)
    if buffer is None or buffer.numel() < numel:
        if buffer is not None:
            _REPLACED.append(buffer)
        buffer = torch.zeros(max(numel, 1024), device=device, dtype=dtype)
        _BUFFERS[key] = buffer
    return buffer


def block_of_word(device: torch.device) -> torch.Tensor:
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
