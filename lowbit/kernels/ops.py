"""lowbit's Triton kernels as PyTorch custom ops, so that ``torch.compile(fullgraph=True)`` and CUDA graphs see
one opaque op (with a fake implementation giving the output's shape) instead of tracing Triton launches, their
launch-configuration caches and inline PTX.

- ``lowbit::w4_linear(x (M, K), codes, scale, zero_point?, global_scale?, bias?, kind, group_size, zero_offset)``
  -> (M, N) in x's dtype: ``x @ dequantize(W).T + bias`` by ``dispatch``'s row rule (GEMV, fused tensor-core
  kernel, or dequantize then cuBLAS); arguments as ``triton_w4.w4_matmul``.
- ``lowbit::fp8_linear(x (M, K), codes, inverse_scale, inverse_scale_row, bias?, activation_amax?, out_dtype,
  fast_accumulation)`` -> (M, N): ``scaled.fp8_linear`` (E4M3 activation codes from one Triton kernel, then
  ``_scaled_mm``).

The ops import triton on first call only; on the CPU nothing here runs (torch's CPU kernels are aten ops).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.kernels import scaled

# bench/results/kernels_h100.md: up to 64 rows the fused kernel's decode tiles win everywhere; at 256 rows
# dequantize + cuBLAS win on 3 of the 4 shapes (fused 0.39-0.52x of bf16, dequantize-first 0.45-0.64x), at
# 2048 rows on all (0.80-0.90x against 0.41-0.51x).
DEQUANTIZE_FIRST_ROWS = 128


def w4_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
              global_scale: torch.Tensor | None, bias: torch.Tensor | None, kind: str, group_size: int,
              zero_offset: int) -> torch.Tensor:
    """``lowbit::w4_linear`` (same arguments) under ``torch.compile``; in eager mode its implementation called
    directly: the op's dispatch would add host time to every call and nothing else."""
    if torch.compiler.is_compiling():
        return torch.ops.lowbit.w4_linear(x, codes, scale, zero_point, global_scale, bias, kind, group_size,
                                          zero_offset)
    return _w4_linear(x, codes, scale, zero_point, global_scale, bias, kind, group_size, zero_offset)


def _w4_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
               global_scale: torch.Tensor | None, bias: torch.Tensor | None, kind: str, group_size: int,
               zero_offset: int) -> torch.Tensor:
    from lowbit.kernels import triton_w4

    arguments = dict(kind=kind, group_size=group_size, zero_point=zero_point, global_scale=global_scale,
                     zero_offset=zero_offset)
    if x.shape[0] == 1 and triton_w4.prefers_gemv(codes.shape[0], x.shape[1]):
        return triton_w4.w4_gemv(x, codes, scale, bias=bias, **arguments)
    if x.shape[0] >= DEQUANTIZE_FIRST_ROWS:
        return F.linear(x, triton_w4.w4_dequantize(codes, scale, dtype=x.dtype, **arguments), bias)
    return triton_w4.w4_matmul(x, codes, scale, bias=bias, **arguments)


_w4_linear_op = torch.library.custom_op("lowbit::w4_linear", _w4_linear, mutates_args=())


@_w4_linear_op.register_fake
def _(x, codes, scale, zero_point, global_scale, bias, kind, group_size, zero_offset):
    return x.new_empty(x.shape[0], codes.shape[0])


@torch.library.custom_op("lowbit::fp8_linear", mutates_args=())
def _fp8_linear_op(x: torch.Tensor, codes: torch.Tensor, inverse_scale: torch.Tensor,
                   inverse_scale_row: torch.Tensor, bias: torch.Tensor | None, activation_amax: torch.Tensor | None,
                   out_dtype: torch.dtype, fast_accumulation: bool = False) -> torch.Tensor:
    return scaled.fp8_linear(x, scaled.Fp8Weight(codes, inverse_scale, inverse_scale_row), bias, activation_amax,
                             out_dtype, fast_accumulation)


@_fp8_linear_op.register_fake
def _(x, codes, inverse_scale, inverse_scale_row, bias, activation_amax, out_dtype, fast_accumulation=False):
    return x.new_empty(x.shape[0], codes.shape[0], dtype=out_dtype)


def fp8_linear(x: torch.Tensor, weight: scaled.Fp8Weight, bias: torch.Tensor | None,
               activation_amax: torch.Tensor | None, out_dtype: torch.dtype,
               fast_accumulation: bool = False) -> torch.Tensor:
    """``scaled.fp8_linear`` (same arguments): through the ``lowbit::fp8_linear`` op under ``torch.compile``,
    directly in eager mode (as ``w4_linear``)."""
    if not torch.compiler.is_compiling():
        return scaled.fp8_linear(x, weight, bias, activation_amax, out_dtype, fast_accumulation)
    return torch.ops.lowbit.fp8_linear(x, weight.codes, weight.inverse_scale, weight.inverse_scale_row, bias,
                                       activation_amax, out_dtype, fast_accumulation)
