"""Triton kernels for 4-bit weights x 16-bit activations: ``out = x @ dequantize(W).T (+ bias)``.

Weight storage (``lowbit.compress.packing``): ``codes`` uint8 (N, K // 2), two 4-bit codes per byte
along K, low nibble first; one scale per ``group_size`` consecutive K elements of a row.

Dequantization reproduces ``lowbit.formats`` exactly (float32 math, then rounded to the activation
dtype), so the kernels multiply the very weights the fake-quant model uses:

- ``INT_DIVIDE`` (symmetric INT, ModelOpt's multiplicative scale): ``w = (u - offset) / scale``. The
  quotient is computed as ``y = q * r`` with ``r = 1 / scale`` (correctly rounded, once per group),
  then one Markstein correction ``y + r * fma(-y, scale, q)``, which is the correctly rounded
  ``q / scale`` (Markstein's theorem: ``y`` is faithful and ``r`` correctly rounded).
- ``INT_AFFINE`` (asymmetric INT): ``w = (u - zero_point) * scale``.
- ``NVFP4``: ``w = e2m1(u) * (block_scale * global_scale)``.

Codes become floats without an integer-to-float conversion (a quarter-rate instruction): a nibble
OR'ed into the mantissa of 2**23 is ``2**23 + u`` (``_nibble_minus``); an E2M1 code's bits are
shifted into an fp16 are its value times 2**-14 (``_e2m1_to_float``).

Two kernels: ``_w4_gemv_kernel`` for one activation row (CUDA-core dot products, the activation
pairs read as 32-bit words), ``_w4_matmul_kernel`` for M >= 2 (tensor cores via ``tl.dot``). Both
split K over ``SPLIT_K`` programs that add their partial sums atomically (the output is zeroed
first); with SPLIT_K > 1 the order of those additions varies between runs.

This module imports triton at import time; ``lowbit.kernels.dispatch`` imports it only on CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

INT_DIVIDE, INT_AFFINE, NVFP4 = 0, 1, 2
KINDS = {"int_divide": INT_DIVIDE, "int_affine": INT_AFFINE, "nvfp4": NVFP4}


MAGIC = tl.constexpr(8388608.0)  # 2**23: a float whose mantissa bits hold a small unsigned integer exactly


@triton.jit
def _nibble_minus(u, shifted_zero):
    """Exact float32 ``u - zero`` of 4-bit codes ``u`` (0..15) without an int-to-float conversion:
    the bits of 2**23 + u, minus ``shifted_zero = zero + 2**23`` (one subtraction, exact)."""
    return (u.to(tl.uint32) | 0x4B000000).to(tl.float32, bitcast=True) - shifted_zero


@triton.jit
def _e2m1_to_float(u):
    """E2M1 code ``u`` -> its value * 2**-14, exact: the code's exponent/mantissa bits placed in an fp16
    (exponent bias 15 instead of 1, so E2M1's subnormal 0.5 is an fp16 subnormal), the sign in bit 15."""
    u16 = u.to(tl.uint16)
    bits = ((u16 & 7) << 9) | ((u16 & 8) << 12)
    return bits.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _group_scales(scale_ptr, zero_ptr, global_scale, offs_n, n_mask, group, n_groups,
                  KIND: tl.constexpr, ZERO_OFFSET: tl.constexpr):
    """(scale, reciprocal, zero + 2**23) of a (BLOCK_N, T) tile of groups, float32, for ``_dequantize``.

    NVFP4's scale is ``block_scale * global_scale * 2**14`` (the 2**14 undoes ``_e2m1_to_float``'s
    factor exactly; the product block * global is rounded once, as lowbit.formats does).
    """
    offsets = offs_n[:, None] * n_groups + group[None, :]
    mask = n_mask[:, None]
    scale = tl.load(scale_ptr + offsets, mask=mask, other=1.0).to(tl.float32)
    if KIND == 2:
        scale = (scale * global_scale) * 16384.0
    reciprocal = scale
    if KIND == 0:
        reciprocal = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
    zero = tl.full(scale.shape, ZERO_OFFSET + MAGIC, tl.float32)
    if KIND == 1:
        zero = tl.load(zero_ptr + offsets, mask=mask, other=0).to(tl.float32) + MAGIC
    return scale, reciprocal, zero


@triton.jit
def _dequantize(u, scale, reciprocal, zero, KIND: tl.constexpr):
    """Float32 weights of 4-bit codes ``u`` (see the module docstring for each KIND's formula)."""
    if KIND == 0:
        q = _nibble_minus(u, zero)
        y = q * reciprocal
        w = tl.fma(tl.fma(-y, scale, q), reciprocal, y)
    elif KIND == 1:
        w = _nibble_minus(u, zero) * scale
    else:
        w = _e2m1_to_float(u) * scale
    return w


@triton.jit
def _store_or_add(out_ptrs, values, mask, SPLIT_K: tl.constexpr):
    if SPLIT_K == 1:
        tl.store(out_ptrs, values, mask=mask)
    else:
        tl.atomic_add(out_ptrs, values, mask=mask, sem="relaxed")


@triton.jit
def _w4_gemv_kernel(
    x_ptr, codes_ptr, scale_ptr, zero_ptr, global_scale_ptr, bias_ptr, out_ptr,
    N, K, M_BUCKET, stride_cn,
    KIND: tl.constexpr, GROUP_SIZE: tl.constexpr, ZERO_OFFSET: tl.constexpr,
    X_IS_BF16: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """out[n] = sum_k x[k] w[n, k] for one row x (K,), read as int32 words of two 16-bit values."""
    TILE_G: tl.constexpr = BLOCK_K if BLOCK_K < GROUP_SIZE else GROUP_SIZE
    T: tl.constexpr = BLOCK_K // TILE_G
    H: tl.constexpr = TILE_G // 2
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    pair = tl.arange(0, T)[:, None] * H + tl.arange(0, H)[None, :]  # (T, H): byte / x-pair index in tile
    code_offsets = offs_n[:, None, None] * stride_cn + pair[None, :, :]
    n_groups = K // GROUP_SIZE
    global_scale = 1.0
    if KIND == 2:
        global_scale = tl.load(global_scale_ptr).to(tl.float32)
    k_len = K // SPLIT_K
    acc = tl.zeros((BLOCK_N, T, H), dtype=tl.float32)
    for step in range(0, k_len // BLOCK_K):
        k0 = tl.multiple_of(pid_k * k_len + step * BLOCK_K, BLOCK_K)
        byte0 = tl.multiple_of(pid_k * (k_len // 2) + step * (BLOCK_K // 2), BLOCK_K // 2)
        u = tl.load(codes_ptr + byte0 + code_offsets, mask=n_mask[:, None, None], other=0)
        words = tl.load(x_ptr + byte0 + pair)
        if X_IS_BF16:
            x_even = (words << 16).to(tl.float32, bitcast=True)
            x_odd = (words & -65536).to(tl.float32, bitcast=True)
        else:
            x_even = (words & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
            x_odd = ((words >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        group = (k0 + tl.arange(0, T) * TILE_G) // GROUP_SIZE
        scale, reciprocal, zero = _group_scales(scale_ptr, zero_ptr, global_scale, offs_n, n_mask, group,
                                                n_groups, KIND, ZERO_OFFSET)
        scale, reciprocal, zero = scale[:, :, None], reciprocal[:, :, None], zero[:, :, None]
        w_even = _dequantize(u & 0xF, scale, reciprocal, zero, KIND).to(out_ptr.dtype.element_ty)
        w_odd = _dequantize(u >> 4, scale, reciprocal, zero, KIND).to(out_ptr.dtype.element_ty)
        acc += w_even.to(tl.float32) * x_even[None, :, :]
        acc += w_odd.to(tl.float32) * x_odd[None, :, :]
    out = tl.sum(tl.sum(acc, axis=2), axis=1)
    if HAS_BIAS:
        if pid_k == 0:
            out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    _store_or_add(out_ptr + offs_n, out.to(out_ptr.dtype.element_ty), n_mask, SPLIT_K)


@triton.jit
def _w4_matmul_kernel(
    x_ptr, codes_ptr, scale_ptr, zero_ptr, global_scale_ptr, bias_ptr, out_ptr,
    M, N, K, M_BUCKET, stride_xm, stride_om,
    KIND: tl.constexpr, GROUP_SIZE: tl.constexpr, ZERO_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """out (M, N) = x (M, K) @ w.T on tensor cores; each weight tile is dequantized once per M tile.

    Program ids run over M fastest, so the programs sharing a weight tile run together (one HBM read).
    """
    TILE_G: tl.constexpr = BLOCK_K if BLOCK_K < GROUP_SIZE else GROUP_SIZE
    T: tl.constexpr = BLOCK_K // TILE_G
    H: tl.constexpr = TILE_G // 2
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    m_tiles = tl.cdiv(M, BLOCK_M)
    pid_m = pid % m_tiles
    pid_n = pid // m_tiles
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    pair = tl.arange(0, T)[:, None] * H + tl.arange(0, H)[None, :]
    code_offsets = offs_n[:, None, None] * (K // 2) + pair[None, :, :]
    x_offsets = offs_m[:, None] * stride_xm + tl.arange(0, BLOCK_K)[None, :]
    n_groups = K // GROUP_SIZE
    global_scale = 1.0
    if KIND == 2:
        global_scale = tl.load(global_scale_ptr).to(tl.float32)
    k_len = K // SPLIT_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, k_len // BLOCK_K):
        k0 = pid_k * k_len + step * BLOCK_K
        u = tl.load(codes_ptr + k0 // 2 + code_offsets, mask=n_mask[:, None, None], other=0)
        group = (k0 + tl.arange(0, T) * TILE_G) // GROUP_SIZE
        scale, reciprocal, zero = _group_scales(scale_ptr, zero_ptr, global_scale, offs_n, n_mask, group,
                                                n_groups, KIND, ZERO_OFFSET)
        scale, reciprocal, zero = scale[:, :, None], reciprocal[:, :, None], zero[:, :, None]
        w_even = _dequantize(u & 0xF, scale, reciprocal, zero, KIND).to(x_ptr.dtype.element_ty)
        w_odd = _dequantize(u >> 4, scale, reciprocal, zero, KIND).to(x_ptr.dtype.element_ty)
        w = tl.reshape(tl.join(w_even, w_odd), (BLOCK_N, BLOCK_K))
        x = tl.load(x_ptr + k0 + x_offsets, mask=m_mask[:, None], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    _store_or_add(out_ptrs, acc.to(out_ptr.dtype.element_ty), m_mask[:, None] & n_mask[None, :], SPLIT_K)


@triton.jit
def _w4_dequantize_kernel(
    codes_ptr, scale_ptr, zero_ptr, global_scale_ptr, out_ptr, N, K,
    KIND: tl.constexpr, GROUP_SIZE: tl.constexpr, ZERO_OFFSET: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out (N, K) = dequantized weights in out's dtype (for dequantize-then-cuBLAS at large M)."""
    TILE_G: tl.constexpr = BLOCK_K if BLOCK_K < GROUP_SIZE else GROUP_SIZE
    T: tl.constexpr = BLOCK_K // TILE_G
    H: tl.constexpr = TILE_G // 2
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    n_mask = offs_n < N
    pair = tl.arange(0, T)[:, None] * H + tl.arange(0, H)[None, :]
    u = tl.load(codes_ptr + k0 // 2 + offs_n[:, None, None] * (K // 2) + pair[None, :, :],
                mask=n_mask[:, None, None], other=0)
    global_scale = 1.0
    if KIND == 2:
        global_scale = tl.load(global_scale_ptr).to(tl.float32)
    group = (k0 + tl.arange(0, T) * TILE_G) // GROUP_SIZE
    scale, reciprocal, zero = _group_scales(scale_ptr, zero_ptr, global_scale, offs_n, n_mask, group,
                                            K // GROUP_SIZE, KIND, ZERO_OFFSET)
    scale, reciprocal, zero = scale[:, :, None], reciprocal[:, :, None], zero[:, :, None]
    w_even = _dequantize(u & 0xF, scale, reciprocal, zero, KIND).to(out_ptr.dtype.element_ty)
    w_odd = _dequantize(u >> 4, scale, reciprocal, zero, KIND).to(out_ptr.dtype.element_ty)
    w = tl.reshape(tl.join(w_even, w_odd), (BLOCK_N, BLOCK_K))
    out_ptrs = out_ptr + offs_n[:, None] * K + k0 + tl.arange(0, BLOCK_K)[None, :]
    tl.store(out_ptrs, w, mask=n_mask[:, None])


# ---- launch configurations ---------------------------------------------------------------------------


def _zero_output(nargs: dict) -> None:
    nargs["out_ptr"].zero_()


def _config(split_k: int = 1, num_warps: int = 4, num_stages: int = 3, **blocks: int) -> triton.Config:
    return triton.Config({**blocks, "SPLIT_K": split_k}, num_warps=num_warps, num_stages=num_stages,
                         pre_hook=_zero_output if split_k > 1 else None)


GEMV_CONFIGS = [
    _config(BLOCK_N=8, BLOCK_K=512, num_stages=2),
    _config(BLOCK_N=8, BLOCK_K=256, num_warps=2, num_stages=3),
    _config(BLOCK_N=16, BLOCK_K=256, num_stages=2),
    _config(BLOCK_N=32, BLOCK_K=256, num_stages=2),
    _config(BLOCK_N=64, BLOCK_K=128, num_stages=2),
    _config(BLOCK_N=16, BLOCK_K=512, num_stages=2),
    _config(BLOCK_N=32, BLOCK_K=512, num_warps=8, num_stages=2),
    _config(BLOCK_N=16, BLOCK_K=256, split_k=4, num_stages=2),
    _config(BLOCK_N=32, BLOCK_K=256, split_k=2, num_stages=2),
    _config(BLOCK_N=16, BLOCK_K=128, split_k=8, num_stages=2),
]
MATMUL_CONFIGS = [
    # decode: one 16-row tile, wide K steps, optional split-K
    _config(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_stages=4),
    _config(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, num_stages=4),
    _config(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, num_stages=3),
    _config(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, num_stages=3),
    _config(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, split_k=4, num_stages=4),
    _config(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, split_k=2, num_stages=3),
    _config(BLOCK_M=16, BLOCK_N=16, BLOCK_K=512, num_stages=3),
    _config(BLOCK_M=16, BLOCK_N=32, BLOCK_K=512, num_stages=2),
    # middle
    _config(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, num_stages=4),
    _config(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_stages=4),
    _config(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_stages=4),
    # prefill: large tiles for the tensor cores
    _config(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4),
    _config(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3),
    _config(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3),
    _config(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
]


# Triton 3.6 fails to compile the wgmma (BLOCK_M >= 64) variant for groups of 16 (NVFP4) in
# TritonGPUOptimizeDotOperands; those shapes use the mma.sync tiles (BLOCK_M <= 32) instead.
SMALLEST_WGMMA_GROUP = 32


def _fits(config: triton.Config, named_args: dict, group_size: int) -> bool:
    """The config tiles K exactly (no K masks) and its K step meets the group boundaries."""
    block_k, split_k = config.kwargs["BLOCK_K"], config.kwargs["SPLIT_K"]
    k = named_args["K"]
    groups_align = block_k % group_size == 0 or group_size % block_k == 0
    return k % (block_k * split_k) == 0 and groups_align


def _prune_gemv(configs, named_args, **kwargs):
    return [c for c in configs if _fits(c, named_args, kwargs["GROUP_SIZE"])]


def _prune_matmul(configs, named_args, **kwargs):
    m = named_args["M"]
    fitting = [c for c in configs if _fits(c, named_args, kwargs["GROUP_SIZE"])]
    if kwargs["GROUP_SIZE"] < SMALLEST_WGMMA_GROUP:
        fitting = [c for c in fitting if c.kwargs["BLOCK_M"] <= 32]
    if m <= 16:
        wanted = [c for c in fitting if c.kwargs["BLOCK_M"] == 16]
    elif m <= 64:
        wanted = [c for c in fitting if c.kwargs["BLOCK_M"] <= 64 and c.kwargs["SPLIT_K"] == 1]
    else:
        wanted = [c for c in fitting if c.kwargs["BLOCK_M"] >= 64]
    return wanted or fitting[:1]


def _quick_bench(kernel_call, quantiles):
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


_TUNE_KEY = ["M_BUCKET", "N", "K", "KIND", "GROUP_SIZE"]
_gemv_tuned = triton.autotune(GEMV_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune_gemv},
                              do_bench=_quick_bench)(_w4_gemv_kernel)
_matmul_tuned = triton.autotune(MATMUL_CONFIGS, key=_TUNE_KEY,
                                prune_configs_by={"early_config_prune": _prune_matmul},
                                do_bench=_quick_bench)(_w4_matmul_kernel)


def _m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(m), 4096)


# ---- entry points ------------------------------------------------------------------------------------


def w4_matmul(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    kind: str,
    group_size: int,
    zero_point: torch.Tensor | None = None,
    global_scale: torch.Tensor | None = None,
    zero_offset: float = 0.0,
    bias: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """``x (M, K) @ dequantize(codes, ...).T + bias`` -> (M, N) in x's dtype (bf16 or fp16).

    ``codes`` uint8 (N, K // 2); ``scale`` (N, K // group_size) (float, or float8_e4m3fn for NVFP4);
    ``zero_point`` (N, K // group_size) for ``kind="int_affine"``; ``global_scale`` a float32 scalar
    tensor for ``"nvfp4"``; ``zero_offset`` the code offset of ``"int_divide"`` (8 for signed INT4).
    ``config`` (block sizes, SPLIT_K, num_warps, num_stages) skips autotuning (tests, interpreter).
    The caller checks shapes and dtypes (``lowbit.kernels.dispatch``); K must be a multiple of 128.
    """
    m, k = x.shape
    n = codes.shape[0]
    kind_id = KINDS[kind]
    common = dict(KIND=kind_id, GROUP_SIZE=group_size, ZERO_OFFSET=float(zero_offset), HAS_BIAS=bias is not None)
    zero_arg = zero_point if zero_point is not None else scale
    global_arg = global_scale if global_scale is not None else scale
    bias_arg = bias if bias is not None else scale
    launch_config = dict(config or {})
    if group_size < SMALLEST_WGMMA_GROUP and launch_config.get("BLOCK_M", 16) > 32:
        raise ValueError(f"config BLOCK_M={launch_config['BLOCK_M']}: groups of {group_size} need BLOCK_M <= 32 "
                         "(Triton 3.6 cannot compile the wgmma tiles for them)")
    split_k = launch_config.get("SPLIT_K", 1)
    out = (torch.zeros if split_k > 1 else torch.empty)((m, n), device=x.device, dtype=x.dtype)
    if m == 1:
        words = x.view(torch.int32)  # two 16-bit activations per word, element 2j in the low half
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])
        kernel = _w4_gemv_kernel if config else _gemv_tuned
        args = (words, codes, scale, zero_arg, global_arg, bias_arg, out, n, k, 1, codes.stride(0))
        kernel[grid](*args, X_IS_BF16=x.dtype == torch.bfloat16, **common, **launch_config)
        return out
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])
    kernel = _w4_matmul_kernel if config else _matmul_tuned
    args = (x, codes, scale, zero_arg, global_arg, bias_arg, out, m, n, k, _m_bucket(m), x.stride(0),
            out.stride(0))
    kernel[grid](*args, **common, **launch_config)
    return out


def w4_dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    kind: str,
    group_size: int,
    dtype: torch.dtype,
    zero_point: torch.Tensor | None = None,
    global_scale: torch.Tensor | None = None,
    zero_offset: float = 0.0,
) -> torch.Tensor:
    """Dequantized weights (N, K) in ``dtype``, equal to lowbit.formats' dequantization."""
    n, k = codes.shape[0], codes.shape[1] * 2
    out = torch.empty((n, k), device=codes.device, dtype=dtype)
    block_n, block_k = 32, 128
    grid = (triton.cdiv(n, block_n), k // block_k)
    _w4_dequantize_kernel[grid](
        codes, scale, zero_point if zero_point is not None else scale,
        global_scale if global_scale is not None else scale, out, n, k,
        KIND=KINDS[kind], GROUP_SIZE=group_size, ZERO_OFFSET=float(zero_offset), BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return out
