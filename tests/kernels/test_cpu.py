"""torch's CPU INT4 / INT8 weight-only kernels fed from lowbit's packed storage (``lowbit.kernels.cpu``).

Reference: float64 ``x @ W.T`` with W the dequantized weight as lowbit.formats defines it (``w = q / scale``,
``w = (c - zero_point) * scale``), written here from the stored codes and scales. The kernel computes
``W' = (c - 8) * S' + Z'`` with ``S'``, ``Z'`` the exact ``S``, ``Z`` rounded to the activation dtype.

Tolerances: float32 activations, relative Frobenius error 1e-5 (S and Z round to float32 once, sums in
float32). bfloat16 activations (``u = 2**-8``, bf16's unit roundoff), in two elementwise steps and one overall:

- the operands: ``|W' - W| <= (u + 2**-22) (|c - 8| S + |Z|)`` (S and Z computed in float32, then rounded
  once to bf16);
- the kernel: ``|out - (x @ W'.T + bias)| <= 3 u (|x| @ |W'|.T + |bias|)``: a bf16 rounding of each weight it
  forms, one of its output, one of the bias addition;
- symmetric INT4 / INT8: relative Frobenius error to the float64 product no worse than 1.5x that of
  dequantize-then-``F.linear`` in bfloat16, the path these kernels replace. Asymmetric codes carry the larger
  error of ``Z' = (8 - zero_point) * scale`` in bf16 (as torchao's CPU INT4 path does): up to 1.6 % on
  per-channel weights with outliers here.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

from lowbit.compress.packed import WeightFormat, quantize_weight
from lowbit.compress.packing import unpack_uint4
from lowbit.kernels import cpu, prepare_linear

INT4_FORMATS = [
    WeightFormat("int", 4, block_size=32),
    WeightFormat("int", 4, block_size=64),
    WeightFormat("int", 4, block_size=128),
    WeightFormat("int", 4, block_size=512),  # two kernel groups of 256 per lowbit block
    WeightFormat("int", 4, per_channel=True),
    WeightFormat("int", 4, block_size=128, narrow_range=True),
    WeightFormat("int_asym", 4, block_size=32),
    WeightFormat("int_asym", 4, block_size=64),
    WeightFormat("int_asym", 4, block_size=128),
    WeightFormat("int_asym", 4, per_channel=True),
]
INT8_FORMATS = [WeightFormat("int", 8, per_channel=True), WeightFormat("int", 8)]
FLOAT32_TOLERANCE = 1e-5


def _weight(shape, seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=generator) * 0.02
    outliers = torch.rand(shape, generator=generator) < 0.002
    return torch.where(outliers, weight * 25, weight)


def _kernel_terms(packed) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 (N, K) ``c - 8`` (INT8: the codes), ``S`` and ``Z`` per element, from the stored tensors by the
    formats' definitions (not PackedWeight.dequantize): W = (c - 8) * S + Z."""
    fmt = packed.format
    n, k = packed.shape
    block = fmt.block_size or k
    codes = unpack_uint4(packed.codes).double() - 8 if fmt.num_bits == 4 else packed.codes.double()
    scale = packed.scale.double().expand(n, k // block).repeat_interleave(block, dim=1)
    if fmt.kind == "int_asym":
        zero = packed.zero_point.double().expand(n, k // block).repeat_interleave(block, dim=1)
        return codes, scale, (8 - zero) * scale
    return codes, 1 / scale, torch.zeros_like(scale)


def _reference_weight(packed) -> torch.Tensor:
    codes, step, zero = _kernel_terms(packed)
    return codes * step + zero


def _relative_error(out, reference):
    return ((out.double() - reference).norm() / reference.norm()).item()


def _operand_weight(prepared, codes: torch.Tensor) -> torch.Tensor:
    """float64 (N, K) W' the kernel multiplies: its (rounded) scales and zeros applied to ``c - 8`` (INT8: codes)."""
    if prepared.function.__name__ == "_cpu_int8":
        return codes * prepared.operands[1].double().reshape(-1, 1)
    _, scale_and_zero, group = prepared.operands
    step = scale_and_zero[..., 0].t().double().repeat_interleave(group, dim=1)
    zero = scale_and_zero[..., 1].t().double().repeat_interleave(group, dim=1)
    return codes * step + zero


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", INT4_FORMATS + INT8_FORMATS, ids=str)
def test_kernel_matches_float64_dequantize_then_matmul(fmt, dtype):
    n, k = 96, 1024
    packed = quantize_weight(_weight((n, k), seed=zlib.crc32(str(fmt).encode())), fmt)
    prepared = prepare_linear(packed, torch.device("cpu"), dtype)
    assert prepared.function.__name__ == {4: "_cpu_int4", 8: "_cpu_int8"}[fmt.num_bits]
    generator = torch.Generator().manual_seed(7)
    x = (torch.randn(2, 5, k, generator=generator) * 2).to(dtype)
    x[0, 0, 3] = 40.0  # an activation outlier
    bias = torch.randn(n, generator=generator).to(dtype)
    out = prepared(x, bias)
    assert out.shape == (2, 5, n) and out.dtype == dtype
    codes, step, zero = _kernel_terms(packed)
    weight = codes * step + zero
    reference = x.double() @ weight.T + bias.double()
    error = _relative_error(out, reference)
    if dtype == torch.float32:
        assert error <= FLOAT32_TOLERANCE
        return
    unit = 2.0**-8
    kernel_weight = _operand_weight(prepared, codes)
    assert ((kernel_weight - weight).abs() <= (unit + 2.0**-22) * (codes.abs() * step + zero.abs())).all()
    emulated = x.double() @ kernel_weight.T + bias.double()
    bound = 3 * unit * (x.double().abs() @ kernel_weight.abs().T + bias.double().abs())
    assert ((out.double() - emulated).abs() <= bound).all()
    if fmt.kind == "int":
        dequantized = F.linear(x, packed.dequantize(dtype), bias)
        assert error <= 1.5 * _relative_error(dequantized, reference)


def test_int4_operands_encode_lowbit_codes_exactly():
    """Scales and zeros in float32: the kernel's (c - 8) * S + Z reproduces every weight of both int kinds to
    float32 rounding (of S, Z, the product and the sum: 4 units of 2**-24 of |c - 8| S + |Z|), read back through
    an identity input (x = I gives W.T)."""
    k = 256
    for fmt in (WeightFormat("int", 4, block_size=64), WeightFormat("int_asym", 4, block_size=64)):
        packed = quantize_weight(_weight((32, k), seed=3), fmt)
        kernel_codes, scale_and_zero, group = cpu.int4_operands(packed, torch.float32)
        weight_t = cpu.int4_linear(torch.eye(k), kernel_codes, scale_and_zero, group)
        codes, step, zero = _kernel_terms(packed)
        bound = 4 * 2.0**-24 * (codes.abs() * step + zero.abs())
        assert ((weight_t.double().T - (codes * step + zero)).abs() <= bound).all()


@pytest.mark.parametrize("fmt, shape", [
    (WeightFormat("int", 4, block_size=16), (32, 256)),  # groups under 32
    (WeightFormat("int", 4, block_size=128), (40, 256)),  # N not a multiple of 16
    (WeightFormat("int", 4, block_size=128, unsigned=True), (32, 256)),
    (WeightFormat("int", 8, block_size=128), (32, 256)),  # INT8 blocks: one scale per row only
    (WeightFormat("mx", (2, 1), block_size=32), (32, 256)),  # NVFP4 and FP8: kernels.cpu_fp (test_cpu_fp.py)
])
def test_formats_without_a_cpu_kernel_dequantize_first(fmt, shape):
    packed = quantize_weight(_weight(shape, seed=5), fmt)
    prepared = prepare_linear(packed, torch.device("cpu"), torch.bfloat16)
    assert prepared.function.__name__ == "_dequantize_first"
    x = torch.randn(3, shape[1]).to(torch.bfloat16)
    assert torch.equal(prepared(x, None), F.linear(x, packed.dequantize(torch.bfloat16)))
