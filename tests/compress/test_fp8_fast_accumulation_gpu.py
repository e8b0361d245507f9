"""``CompressedLinear.fp8_fast_accumulation``: FP8 W8A8 layers on CUDA with ``_scaled_mm``'s fast accumulation, off
by default (the default output unchanged, bit for bit), on when set and prepared; both within their bound of a
float64 product of the same activation and weight codes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit import formats
from lowbit.compress.convert import compress
from lowbit.kernels import Fp8Weight, fp8_linear

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _activations(rows: int, k: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(rows, k, generator=generator, device="cuda")
    return torch.where(torch.rand(rows, k, generator=generator, device="cuda") < 0.01, x * 30, x).to(torch.bfloat16)


@pytest.mark.parametrize("preset", ["FP8_DEFAULT_CFG", "FP8_PER_CHANNEL_PER_TOKEN_CFG"])
def test_fast_accumulation_is_opt_in_and_within_bound(preset):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs sm89+")
    generator = torch.Generator(device="cuda").manual_seed(0)
    rows, k, n = 300, 4096, 256  # long K: where fast accumulation's sums differ
    linear = nn.Linear(k, n, device="cuda", dtype=torch.bfloat16)
    x = _activations(rows, k, generator)
    with torch.no_grad():
        layer = compress(lowbit.quantize(nn.Sequential(linear), copy.deepcopy(getattr(lowbit, preset)),
                                         lambda m: m(x)))[0]
        default = layer(x)
        layer.fp8_fast_accumulation = True
        layer.prepare(torch.bfloat16)
        fast = layer(x)
    packed = layer.packed
    quantizer = layer.input_quantizer
    amax = None if quantizer.config.is_dynamic else quantizer.amax.float().reshape(1)
    weight = Fp8Weight.from_codes(packed.codes, packed.scale)
    with torch.no_grad():
        assert torch.equal(default, fp8_linear(x, weight, layer.bias, amax, torch.bfloat16))
        assert torch.equal(fast, fp8_linear(x, weight, layer.bias, amax, torch.bfloat16, fast_accumulation=True))
    x_amax = x.float().abs().amax(dim=1, keepdim=True) if amax is None else amax.reshape(1, 1)
    x_codes, x_scale = formats.quantize_fp(x, x_amax, formats.E4M3)
    w_hat = packed.codes.double() / packed.scale.double().reshape(-1, 1)
    reference = (x_codes.double() / x_scale.double()) @ w_hat.T + layer.bias.double()
    for out in (default, fast):
        assert ((out.double() - reference).norm() / reference.norm()).item() < 5e-3  # bf16 output + FP8 sums
