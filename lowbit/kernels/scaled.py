"""W8A8 matmuls on 8-bit codes: FP8 through ``torch._scaled_mm``, INT8 through ``torch._int_mm``.

Scales follow lowbit.formats' multiplicative convention, ``x_hat = codes / scale``, so

    out = (x_codes @ w_codes.T) / (x_scale * w_scale.T) + bias

with ``x_scale`` a scalar / (1, 1) (per tensor) or (M, 1) (per row) and ``w_scale`` (1, 1) or (N, 1)
(per output channel), all float32. The products of codes are exact (FP8 x FP8 in the tensor cores'
accumulator, INT8 x INT8 in int32); only the final scaling rounds differently from fake quantization.

``fp8_linear`` starts from 16-bit activations: one Triton kernel quantizes them (``fp8_quant``: static
per-tensor or dynamic per-row scales, the codes lowbit.formats would produce), one ``_scaled_mm`` multiplies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# cuBLASLt's FP8 and INT8 kernels want row counts padded to these multiples (and _int_mm M > 16).
FP8_ROW_MULTIPLE = 16
INT8_MIN_ROWS = 17


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    return x if x.shape[0] >= rows else torch.cat([x, x.new_zeros(rows - x.shape[0], x.shape[1])])


def fp8_matmul(
    x_codes: torch.Tensor,
    x_scale: torch.Tensor,
    w_codes: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """(M, K) float8 x (N, K) float8 -> (M, N) ``out_dtype`` with one ``torch._scaled_mm`` call.

    Per-tensor scales on both sides use cuBLAS's tensor-wise scaling; otherwise both sides are
    expanded to row-wise scales (x: (M, 1), w: (1, N)), which needs a bfloat16 output.
    """
    m = x_codes.shape[0]
    padded = -m % FP8_ROW_MULTIPLE
    if padded:
        x_codes = _pad_rows(x_codes, m + padded)
    scale_a = x_scale.float().reciprocal()
    scale_b = w_scale.float().reciprocal()
    if scale_a.numel() == 1 and scale_b.numel() == 1:
        out = torch._scaled_mm(x_codes, w_codes.t(), scale_a=scale_a.reshape(()), scale_b=scale_b.reshape(()),
                               bias=bias, out_dtype=out_dtype)
        return out[:m]
    rows = x_codes.shape[0]
    scale_a = scale_a.reshape(-1, 1)
    scale_a = scale_a.expand(rows, 1) if scale_a.numel() == 1 else _pad_rows(scale_a, rows)
    scale_b = scale_b.reshape(1, -1).expand(1, w_codes.shape[0]).contiguous()
    if x_codes.device.type == "cpu":  # torch < 2.13 has no row-wise scales in its CPU _scaled_mm
        out = ((x_codes.float() @ w_codes.float().t()) * scale_a * scale_b).to(torch.bfloat16)[:m]
    else:
        out = torch._scaled_mm(x_codes, w_codes.t(), scale_a=scale_a.contiguous(), scale_b=scale_b,
                               out_dtype=torch.bfloat16)[:m]
    out = out if bias is None else out + bias
    return out.to(out_dtype)


def int8_matmul(
    x_codes: torch.Tensor,
    x_scale: torch.Tensor,
    w_codes: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """(M, K) int8 x (N, K) int8 -> int32 by ``torch._int_mm``, then ``/ x_scale / w_scale.T`` in float32."""
    m = x_codes.shape[0]
    rows = INT8_MIN_ROWS if x_codes.is_cuda else 1
    accumulated = torch._int_mm(_pad_rows(x_codes, rows), w_codes.t())[:m]
    out = accumulated.float() / x_scale.float().reshape(-1, 1) / w_scale.float().reshape(1, -1)
    out = out if bias is None else out + bias.float()
    return out.to(out_dtype)


@dataclass(frozen=True)
class Fp8Weight:
    """An E4M3 weight prepared once for ``fp8_linear``: ``codes`` (N, K) and the inverse of its scale,
    ``inverse_scale`` () or (1, N) float32, and the same as a (1, N) row for row-wise scaling."""

    codes: torch.Tensor
    inverse_scale: torch.Tensor
    inverse_scale_row: torch.Tensor

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor) -> Fp8Weight:
        """From float8_e4m3fn codes (N, K) and lowbit's scale ((1, 1) per tensor or (N, 1) per channel)."""
        if codes.dtype != torch.float8_e4m3fn or codes.dim() != 2:
            raise TypeError(f"codes must be a 2-D float8_e4m3fn tensor, got {codes.dtype} {tuple(codes.shape)}")
        if scale.numel() not in (1, codes.shape[0]):
            raise ValueError(f"scale has {scale.numel()} elements: expected 1 or {codes.shape[0]} (one per row)")
        inverse = scale.float().reciprocal()
        row = inverse.reshape(1, -1).expand(1, codes.shape[0]).contiguous()
        return cls(codes, inverse.reshape(()) if scale.numel() == 1 else row, row)


def fp8_linear(
    x: torch.Tensor,
    weight: Fp8Weight,
    bias: torch.Tensor | None,
    activation_amax: torch.Tensor | None,
    out_dtype: torch.dtype,
    fast_accumulation: bool = False,
) -> torch.Tensor:
    """x (M, K) -> (M, N) ``out_dtype``: E4M3 codes of x (static per-tensor ``activation_amax``, or dynamic
    per-row scales when it is None) times the weight codes, rescaled, + bias. CUDA only (Triton + cuBLASLt).

    Per-tensor on both sides uses cuBLAS's tensor-wise scaling (bias fused); otherwise row-wise scaling
    with a bfloat16 result. ``fast_accumulation``: ``_scaled_mm``'s ``use_fast_accum`` (Hopper's FP8 tensor-core
    sums are not promoted to float32 every few K steps: faster, less accurate over long K).
    """
    from lowbit.kernels.fp8_quant import quantize_fp8

    m = x.shape[0]
    padded = m + (-m % FP8_ROW_MULTIPLE)
    tensor_wise = activation_amax is not None and weight.inverse_scale.numel() == 1
    x_codes, x_inverse = quantize_fp8(x, activation_amax, padded, row_scales=not tensor_wise)
    w_t = weight.codes.t()
    if tensor_wise:
        out = torch._scaled_mm(x_codes, w_t, scale_a=x_inverse, scale_b=weight.inverse_scale, bias=bias,
                               out_dtype=out_dtype, use_fast_accum=fast_accumulation)
        return out[:m]
    out = torch._scaled_mm(x_codes, w_t, scale_a=x_inverse, scale_b=weight.inverse_scale_row,
                           out_dtype=torch.bfloat16, use_fast_accum=fast_accumulation)[:m]
    out = out if bias is None else out + bias
    return out.to(out_dtype)
