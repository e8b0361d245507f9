"""lowbit's CUDA INT8 weight-only path (``lowbit.kernels.dispatch._cuda_int8``): ``(x @ codes.T) * m`` with the
codes cast exactly to the activation dtype, cuBLAS's float32 sum rounded once to that dtype, the row multipliers
``m = 1 / scale`` rounded once to it, and the product rounded. Reference: float64 ``x @ (codes * m').T + bias`` with
``m'`` the kernel's own rounded multipliers (within one rounding of lowbit's exact ones), elementwise within
``4 u (|x| @ |W'|.T + |bias|)`` (u = 2**-8 in bf16, 2**-11 in fp16: the sum's, the product's and the bias add's
roundings and the float32 sum's error)."""

from __future__ import annotations

import pytest
import torch

from lowbit.compress.packed import WeightFormat, quantize_weight
from lowbit.kernels import prepare_linear
from tests.kernels.test_cpu import _weight

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

UNITS = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@pytest.mark.parametrize("rows", [1, 3, 300])
@pytest.mark.parametrize("dtype", list(UNITS), ids=str)
@pytest.mark.parametrize("fmt", [WeightFormat("int", 8, per_channel=True), WeightFormat("int", 8)], ids=str)
def test_int8_rows_match_float64_within_rounding_bounds(fmt, dtype, rows):
    n, k = 96, 1024
    packed_cpu = quantize_weight(_weight((n, k), seed=rows), fmt)
    packed = packed_cpu.with_tensors({name: tensor.cuda() for name, tensor in packed_cpu.tensors().items()})
    prepared = prepare_linear(packed, torch.device("cuda"), dtype)
    assert prepared.function.__name__ == "_cuda_int8"
    generator = torch.Generator().manual_seed(rows + 7)
    x = (torch.randn(rows, k, generator=generator) * 2).to(dtype)
    x[0, 5] = 40.0  # an activation outlier
    bias = torch.randn(n, generator=generator).to(dtype)
    with torch.inference_mode():
        out = prepared(x.cuda(), bias.cuda()).cpu().double()
    codes = packed_cpu.codes.double()
    exact = packed_cpu.scale.double().reciprocal().reshape(-1, 1).expand(n, 1)
    multipliers = prepared.operands[1].cpu().double().reshape(-1, 1)
    unit = UNITS[dtype]
    assert ((multipliers - exact).abs() <= unit * exact.abs()).all()
    weight = codes * multipliers
    assert torch.equal(weight / multipliers, codes) and codes.abs().max() <= 127
    emulated = x.double() @ weight.T + bias.double()
    bound = 4 * unit * (x.double().abs() @ weight.abs().T + bias.double().abs())
    assert ((out - emulated).abs() <= bound).all()
