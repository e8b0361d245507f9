"""torch's CUDA INT4 kernel fed from lowbit's packed storage (``lowbit.kernels.cuda_int4``), the few-row path of
``prepare_linear`` on CUDA. Reference and tolerances as tests/kernels/test_cpu.py's bfloat16 case: float64
``x @ W'.T + bias`` with ``W' = (c - 8) * S' + Z'`` from the kernel's own rounded scales, elementwise within
``3 u (|x| @ |W'|.T + |bias|)`` (u = 2**-8), and W' within one bf16 rounding of lowbit's exact weight."""

from __future__ import annotations

import zlib

import pytest
import torch

from lowbit.compress.packed import WeightFormat, quantize_weight
from lowbit.kernels import prepare_linear
from tests.kernels.test_cpu import _kernel_terms, _weight

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

FORMATS = [WeightFormat("int", 4, block_size=32), WeightFormat("int", 4, block_size=128),
           WeightFormat("int", 4, per_channel=True), WeightFormat("int_asym", 4, block_size=64),
           WeightFormat("int_asym", 4, block_size=128)]


@pytest.mark.parametrize("rows", [1, 3, 4])
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_few_rows_match_float64_within_bf16_bounds(fmt, rows):
    n, k = 96, 1024
    packed_cpu = quantize_weight(_weight((n, k), seed=zlib.crc32(str(fmt).encode())), fmt)
    packed = packed_cpu.with_tensors({name: tensor.cuda() for name, tensor in packed_cpu.tensors().items()})
    prepared = prepare_linear(packed, torch.device("cuda"), torch.bfloat16)
    assert prepared.function.__name__ == "_cuda_int4"
    generator = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, k, generator=generator) * 2).to(torch.bfloat16)
    x[0, 3] = 40.0  # an activation outlier
    bias = torch.randn(n, generator=generator).to(torch.bfloat16)
    out = prepared(x.cuda(), bias.cuda()).cpu()
    _, scale_and_zero, group = prepared.operands[:3]
    codes, step, zero = _kernel_terms(packed_cpu)
    kernel_step = scale_and_zero[..., 0].t().double().cpu().repeat_interleave(group, dim=1)
    kernel_zero = scale_and_zero[..., 1].t().double().cpu().repeat_interleave(group, dim=1)
    kernel_weight = codes * kernel_step + kernel_zero
    unit = 2.0**-8
    exact = codes * step + zero
    assert ((kernel_weight - exact).abs() <= (unit + 2.0**-22) * (codes.abs() * step + zero.abs())).all()
    emulated = x.double() @ kernel_weight.T + bias.double()
    bound = 3 * unit * (x.double().abs() @ kernel_weight.abs().T + bias.double().abs())
    assert ((out.double() - emulated).abs() <= bound).all()


def test_more_rows_go_to_the_triton_kernels():
    fmt = WeightFormat("int", 4, block_size=128)
    packed = quantize_weight(_weight((96, 1024), seed=5).cuda(), fmt)
    prepared = prepare_linear(packed, torch.device("cuda"), torch.bfloat16)
    x = torch.randn(5, 1024, device="cuda").to(torch.bfloat16)
    reference = x.double() @ packed.dequantize(torch.float64).T
    out = prepared(x, None).double()
    assert ((out - reference).norm() / reference.norm()).item() < 2.0**-7
