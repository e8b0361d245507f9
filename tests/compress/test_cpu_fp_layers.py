"""Compressed FP8 / NVFP4 layers on the CPU run lowbit's C kernels (``lowbit.kernels.cpu_fp``), chosen at compress().

Reference: float64 math written here from the fake-quant weights (and, for W8A8, the fake-quant activations,
``input_quantizer(x)``: E4M3 values over the activation scale); tolerance: the float32 summation bound
``(K + 3) * 2**-24 * (|x| @ |W|.T)`` plus one bf16 rounding of the output (2**-8 relative) and of the bias
addition. Above ``GEMV_MAX_ROWS`` rows the layers dequantize as before: equal to the fake-quant model bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.compress import compress
from lowbit.compress.linear import CompressedLinear
from lowbit.kernels import cpu_fp

pytestmark = pytest.mark.skipif(not cpu_fp.available(), reason="no C compiler: lowbit's CPU FP8 / NVFP4 kernels off")

FP8_WEIGHT_ONLY = {"quant_cfg": {"*weight_quantizer": {"num_bits": (4, 3), "axis": 0}, "default": {"enable": False}},
                   "algorithm": "max"}
PRESETS = {"W4A16_NVFP4_CFG": "_cpu_fp", "FP8_WEIGHT_ONLY": "_cpu_fp", "FP8_DEFAULT_CFG": "_cpu_fp8_rows",
           "FP8_PER_CHANNEL_PER_TOKEN_CFG": "_cpu_fp8_rows"}
U32, U16 = 2.0**-24, 2.0**-8


def _quantized(preset: str) -> tuple[nn.Module, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(256, 384), nn.GELU(), nn.Linear(384, 128, bias=False))
    with torch.no_grad():
        for parameter in model.parameters():
            outliers = torch.rand(parameter.shape, generator=generator) < 0.01
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * torch.where(outliers, 1.0, 0.05))
    model = model.to(torch.bfloat16)
    batches = [torch.randn(4, 256, generator=generator).to(torch.bfloat16) for _ in range(2)]
    config = FP8_WEIGHT_ONLY if preset == "FP8_WEIGHT_ONLY" else getattr(lowbit, preset)
    model = lowbit.quantize(model, copy.deepcopy(config), lambda m: [m(b) for b in batches])
    return model, torch.randn(20, 256, generator=generator).to(torch.bfloat16)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_few_rows_run_the_kernel_within_float32_bounds(preset):
    model, x = _quantized(preset)
    first = model[0]
    with torch.no_grad():
        x_hat = first.input_quantizer(x).double()  # identity when the input quantizer is off
        weight = first.weight_quantizer(first.weight).double()
    compressed = compress(model)
    layers = [m for m in compressed.modules() if isinstance(m, CompressedLinear)]
    assert [layer._prepared.function.__name__ for layer in layers] == [PRESETS[preset]] * 2
    rows = x[:cpu_fp.GEMV_MAX_ROWS]
    with torch.no_grad():
        out = compressed[0](rows).double()
    reference = x_hat[:cpu_fp.GEMV_MAX_ROWS] @ weight.T + first.bias.double()
    magnitude = x_hat[:cpu_fp.GEMV_MAX_ROWS].abs() @ weight.abs().T
    bound = (256 + 3) * U32 * magnitude + 2 * U16 * (magnitude + first.bias.double().abs()) + 1e-30
    assert ((out - reference).abs() <= bound).all()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_many_rows_dequantize_bitwise_as_fake_quant(preset):
    model, x = _quantized(preset)
    assert x.shape[0] > cpu_fp.GEMV_MAX_ROWS
    with torch.no_grad():
        expected = model(x)
        out = compress(model)(x)
    assert torch.equal(out, expected)
