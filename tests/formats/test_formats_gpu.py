"""Every format function gives bit-identical results on CPU and CUDA (same float32 ops)."""

from __future__ import annotations

import pytest
import torch

from lowbit.formats import (
    E2M1,
    E4M3,
    E5M2,
    block_amax,
    dequantize_mx,
    dequantize_nvfp4,
    encode_e2m1,
    fake_quant_fp,
    fake_quant_int,
    fake_quant_int_asym,
    fake_quant_mx,
    fake_quant_nvfp4,
    quantize_int,
    quantize_int_asym,
    quantize_mx,
    quantize_nvfp4,
    round_to_format,
    to_blocks,
)
from lowbit.formats.minifloat import _round_generic

from .reference import random_with_outliers

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def same_on_cuda(function, *tensors, **options):
    """Run ``function`` on CPU and on CUDA copies of ``tensors``; outputs must be identical.

    Identical: same dtype, same NaN positions, and elsewhere the same bits (NaN payloads may differ:
    CUDA's canonical NaN is not the CPU's).
    """
    on_cpu = function(*tensors, **options)
    on_cuda = function(*(t.cuda() if isinstance(t, torch.Tensor) else t for t in tensors), **options)
    outputs = zip(on_cpu, on_cuda, strict=True) if isinstance(on_cpu, tuple) else [(on_cpu, on_cuda)]
    for cpu, cuda in outputs:
        assert cuda.device.type == "cuda" and cpu.dtype == cuda.dtype and cpu.shape == cuda.shape
        cuda = cuda.cpu()
        if cpu.is_floating_point():
            cpu_nan, cuda_nan = torch.isnan(cpu.float()), torch.isnan(cuda.float())
            assert torch.equal(cpu_nan, cuda_nan)
            cpu, cuda = cpu[~cpu_nan], cuda[~cuda_nan]
        assert torch.equal(cpu.view(torch.uint8), cuda.view(torch.uint8))


@pytest.fixture
def data():
    generator = torch.Generator().manual_seed(23)
    x = random_with_outliers((64, 256), generator)
    x[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    return x


@pytest.mark.parametrize("num_bits", [2, 4, 8])
def test_integer(data, num_bits):
    x = data.nan_to_num(0.0, 100.0, -100.0)
    amax = x.abs().amax(dim=1, keepdim=True)
    amax[3] = 0
    same_on_cuda(quantize_int, x, amax, num_bits)
    same_on_cuda(fake_quant_int, x.bfloat16(), amax, num_bits, narrow_range=True)
    same_on_cuda(quantize_int_asym, x, x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True), num_bits)
    same_on_cuda(fake_quant_int_asym, x, x.amin(), x.amax(), num_bits)
    blocks = to_blocks(x, 16)
    same_on_cuda(quantize_int, blocks, block_amax(x, 16), num_bits)


@pytest.mark.parametrize("fmt", [E4M3, E5M2, E2M1], ids=["E4M3", "E5M2", "E2M1"])
def test_minifloat(data, fmt):
    wide = data * torch.logspace(-12, 12, data.shape[1], base=2.0)
    same_on_cuda(round_to_format, wide, fmt)
    same_on_cuda(_round_generic, wide, fmt)
    same_on_cuda(round_to_format, wide.half(), fmt)
    same_on_cuda(fake_quant_fp, data, data.nan_to_num(0.0, 1.0, 1.0).abs().amax(dim=0, keepdim=True), fmt)
    same_on_cuda(encode_e2m1, wide)


def test_nvfp4(data):
    x = data.nan_to_num(0.0, 50.0, -50.0)
    x[1, :16] = 0
    x[2, 16:32] *= 1e-6
    same_on_cuda(quantize_nvfp4, x)
    same_on_cuda(quantize_nvfp4, x.reshape(4, 16, 256), torch.tensor(10.0))
    same_on_cuda(fake_quant_nvfp4, x.bfloat16())
    same_on_cuda(dequantize_nvfp4, *quantize_nvfp4(x))


@pytest.mark.parametrize("fmt", [E4M3, E5M2, E2M1], ids=["E4M3", "E5M2", "E2M1"])
def test_mx(data, fmt):
    x = data.clone()
    x[1, :32] = 0
    x[2, :32] *= 1e-40
    same_on_cuda(quantize_mx, x, fmt)
    same_on_cuda(fake_quant_mx, x.bfloat16(), fmt)
    same_on_cuda(dequantize_mx, *quantize_mx(x, fmt))
