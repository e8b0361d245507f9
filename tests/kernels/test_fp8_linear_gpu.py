"""FP8 W8A8 from 16-bit activations on CUDA: the Triton activation quantization equals lowbit.formats' codes,
and fp8_linear matches a float64 product of the codes."""

from __future__ import annotations

import pytest
import torch

from lowbit import formats
from lowbit.kernels import Fp8Weight, fp8_linear

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _activations(rows: int, k: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(rows, k, generator=generator, device="cuda")
    outliers = torch.rand(rows, k, generator=generator, device="cuda") < 0.01
    return torch.where(outliers, x * 50, x).to(torch.bfloat16)


@pytest.mark.parametrize("rows, k", [(1, 256), (37, 3000), (64, 4096)])
@pytest.mark.parametrize("dynamic", [True, False])
def test_quantize_fp8_equals_formats(rows, k, dynamic):
    from lowbit.kernels.fp8_quant import quantize_fp8

    generator = torch.Generator(device="cuda").manual_seed(0)
    x = _activations(rows, k, generator)
    x[0] = 0  # an all-zero row: scale 1, codes 0
    amax = None if dynamic else x.float().abs().amax().reshape(1, 1) * 0.5  # static: saturates the outliers
    padded = rows + (-rows % 16)
    codes, inverse_scale = quantize_fp8(x, amax, padded, row_scales=not dynamic and rows % 2 == 1)
    reference_amax = x.float().abs().amax(dim=1, keepdim=True) if dynamic else amax
    values, scale = formats.quantize_fp(x, reference_amax, formats.E4M3)
    assert torch.equal(codes[:rows].float(), values)
    assert not codes[rows:].float().any()
    assert torch.equal(inverse_scale.reshape(-1)[: scale.numel()], scale.reshape(-1).reciprocal())


@pytest.mark.parametrize("rows", [1, 16, 70])
@pytest.mark.parametrize("dynamic, per_channel", [(False, False), (True, False), (False, True), (True, True)])
def test_fp8_linear_matches_float64(rows, dynamic, per_channel):
    generator = torch.Generator(device="cuda").manual_seed(1)
    x = _activations(rows, 512, generator)
    w = torch.randn(96, 512, generator=generator, device="cuda")
    bias = torch.randn(96, generator=generator, device="cuda").to(torch.bfloat16)
    w_amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax().reshape(1, 1)
    w_codes, w_scale = formats.quantize_fp(w, w_amax, formats.E4M3)
    weight = Fp8Weight.from_codes(w_codes.to(torch.float8_e4m3fn), w_scale)
    amax = None if dynamic else x.float().abs().amax().reshape(1, 1)
    out = fp8_linear(x, weight, bias, amax, torch.bfloat16)
    x_amax = x.float().abs().amax(dim=1, keepdim=True) if dynamic else amax
    x_codes, x_scale = formats.quantize_fp(x, x_amax, formats.E4M3)
    reference = (x_codes.double() / x_scale.double()) @ (w_codes.double() / w_scale.double()).T + bias.double()
    assert out.shape == (rows, 96) and out.dtype == torch.bfloat16
    assert ((out.double() - reference).norm() / reference.norm()).item() < 5e-3
