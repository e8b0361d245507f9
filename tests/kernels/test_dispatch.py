"""CPU kernels: the dequantize fallback equals fake quant bit for bit; W8A8 matmuls against float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowbit.compress.packed import WeightFormat, quantize_weight
from lowbit.kernels import Fp8Weight, dispatch, fp8_matmul, int8_matmul, weight_only_linear


@pytest.mark.parametrize("fmt", [WeightFormat("int", 4, block_size=32), WeightFormat("nvfp4", (2, 1), block_size=16),
                                 WeightFormat("float", (4, 3), per_channel=True)], ids=lambda f: f.kind)
def test_cpu_fallback_is_fake_quant_linear(fmt):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 128, generator=generator).to(torch.bfloat16)
    packed = quantize_weight(weight, fmt)
    x = torch.randn(3, 5, 128, generator=generator).to(torch.bfloat16)
    bias = torch.randn(24, generator=generator).to(torch.bfloat16)
    expected = F.linear(x, packed.dequantize(torch.bfloat16), bias)
    assert torch.equal(weight_only_linear(x, packed, bias), expected)


def test_triton_arguments_by_format():
    weight = torch.randn(16, 256, generator=torch.Generator().manual_seed(1))
    arguments = {
        name: dispatch.triton_arguments(quantize_weight(weight, fmt))
        for name, fmt in {
            "int4": WeightFormat("int", 4, block_size=128),
            "int4 channel": WeightFormat("int", 4, per_channel=True),
            "int4 tensor": WeightFormat("int", 4),
            "asym": WeightFormat("int_asym", 4, block_size=64),
            "nvfp4": WeightFormat("nvfp4", (2, 1), block_size=16),
            "int8": WeightFormat("int", 8, per_channel=True),
            "mxfp4": WeightFormat("mx", (2, 1), block_size=32),
        }.items()
    }
    assert arguments["int4"] == {"kind": "int_divide", "group_size": 128, "zero_offset": 8}
    assert arguments["int4 channel"]["group_size"] == 256
    assert arguments["int4 tensor"] is None  # one scale for the tensor: the kernels index per row
    assert arguments["asym"]["kind"] == "int_affine" and arguments["asym"]["zero_point"] is not None
    assert arguments["nvfp4"]["kind"] == "nvfp4" and arguments["nvfp4"]["global_scale"] is not None
    assert arguments["int8"] is None and arguments["mxfp4"] is None


def _codes(values, maximum, dtype, rowwise):
    amax = values.abs().amax(dim=1, keepdim=True) if rowwise else values.abs().amax().reshape(1, 1)
    scale = maximum / amax
    scaled = (values * scale).clamp(-maximum, maximum)
    return (scaled.round() if dtype == torch.int8 else scaled).to(dtype), scale


@pytest.mark.parametrize("rows", [1, 9])
def test_int8_matmul_cpu(rows):
    generator = torch.Generator().manual_seed(2)
    xq, xs = _codes(torch.randn(rows, 64, generator=generator), 127.0, torch.int8, True)
    wq, ws = _codes(torch.randn(32, 64, generator=generator), 127.0, torch.int8, True)
    bias = torch.randn(32, generator=generator)
    out = int8_matmul(xq, xs, wq, ws, bias, torch.float32)
    reference = (xq.double() / xs.double()) @ (wq.double() / ws.double()).T + bias.double()
    assert ((out.double() - reference).norm() / reference.norm()).item() < 1e-6


@pytest.mark.parametrize("rowwise", [False, True])
def test_fp8_matmul_cpu(rowwise):
    generator = torch.Generator().manual_seed(3)
    xq, xs = _codes(torch.randn(7, 64, generator=generator), 448.0, torch.float8_e4m3fn, rowwise)
    wq, ws = _codes(torch.randn(32, 64, generator=generator), 448.0, torch.float8_e4m3fn, rowwise)
    out = fp8_matmul(xq, xs, wq, ws, None, torch.bfloat16)
    reference = (xq.double() / xs.double()) @ (wq.double() / ws.double()).T
    assert out.shape == (7, 32)
    assert ((out.double() - reference).norm() / reference.norm()).item() < 5e-3


def test_fp8_weight_checks_codes_and_scale():
    codes = torch.zeros(8, 32).to(torch.float8_e4m3fn)
    weight = Fp8Weight.from_codes(codes, torch.full((8, 1), 4.0))
    assert weight.inverse_scale.shape == (1, 8) and torch.equal(weight.inverse_scale_row, torch.full((1, 8), 0.25))
    assert Fp8Weight.from_codes(codes, torch.tensor([[2.0]])).inverse_scale.shape == ()
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        Fp8Weight.from_codes(codes.float(), torch.ones(1, 1))
    with pytest.raises(ValueError, match="one per row"):
        Fp8Weight.from_codes(codes, torch.ones(3, 1))
