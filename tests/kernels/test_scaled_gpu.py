"""FP8 (torch._scaled_mm) and INT8 (torch._int_mm) W8A8 matmuls on CUDA against float64."""

from __future__ import annotations

import pytest
import torch

from lowbit.kernels import fp8_matmul, int8_matmul

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _codes(values: torch.Tensor, maximum: float, dtype: torch.dtype, rowwise: bool):
    amax = values.abs().amax(dim=1, keepdim=True) if rowwise else values.abs().amax().reshape(1, 1)
    scale = maximum / amax
    scaled = (values * scale).clamp(-maximum, maximum)
    return (scaled.round() if dtype == torch.int8 else scaled).to(dtype), scale


@pytest.mark.parametrize("rows", [1, 5, 16, 70])
@pytest.mark.parametrize("x_rowwise, w_rowwise", [(False, False), (True, True), (False, True)])
def test_fp8_matmul(rows, x_rowwise, w_rowwise):
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, 256, generator=generator, device="cuda")
    w = torch.randn(96, 256, generator=generator, device="cuda")
    bias = torch.randn(96, generator=generator, device="cuda").to(torch.bfloat16)
    xq, xs = _codes(x, 448.0, torch.float8_e4m3fn, x_rowwise)
    wq, ws = _codes(w, 448.0, torch.float8_e4m3fn, w_rowwise)
    out = fp8_matmul(xq, xs, wq, ws, bias, torch.bfloat16)
    reference = (xq.double() / xs.double()) @ (wq.double() / ws.double()).T + bias.double()
    assert out.shape == (rows, 96) and out.dtype == torch.bfloat16
    assert ((out.double() - reference).norm() / reference.norm()).item() < 5e-3


@pytest.mark.parametrize("rows", [1, 16, 17, 64])
def test_int8_matmul(rows):
    generator = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(rows, 256, generator=generator, device="cuda")
    w = torch.randn(96, 256, generator=generator, device="cuda")
    xq, xs = _codes(x, 127.0, torch.int8, True)
    wq, ws = _codes(w, 127.0, torch.int8, True)
    out = int8_matmul(xq, xs, wq, ws, None, torch.float32)
    reference = (xq.double() / xs.double()) @ (wq.double() / ws.double()).T
    assert ((out.double() - reference).norm() / reference.norm()).item() < 1e-6
