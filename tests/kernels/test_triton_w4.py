"""Triton W4A16 kernels on CUDA against float64 products of lowbit.formats' dequantized weights."""

from __future__ import annotations

import pytest
import torch

from lowbit.compress.packed import WeightFormat, quantize_weight
from lowbit.kernels import dispatch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
FORMATS = [
    WeightFormat("int", 4, block_size=128),
    WeightFormat("int", 4, block_size=32),
    WeightFormat("int", 4, per_channel=True),
    WeightFormat("int", 4, block_size=128, unsigned=True),
    WeightFormat("int", 3, block_size=64),
    WeightFormat("int_asym", 4, block_size=128),
    WeightFormat("int_asym", 4, block_size=64),
    WeightFormat("nvfp4", (2, 1), block_size=16),
]
CONFIGS = {  # explicit launches, one per code path (no autotuning)
    "gemv": dict(BLOCK_N=32, BLOCK_K=256, SPLIT_K=1, num_warps=4, num_stages=2),
    "gemv-split": dict(BLOCK_N=16, BLOCK_K=128, SPLIT_K=4, num_warps=4, num_stages=2),
    "mma": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=1, num_warps=4, num_stages=3),
    "mma-split": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, SPLIT_K=2, num_warps=4, num_stages=3),
    "mma-large": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, SPLIT_K=1, num_warps=8, num_stages=3),
}


def _weight(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    w = torch.randn(n, k, generator=generator, device="cuda") * 0.05
    outliers = torch.rand(n, k, generator=generator, device="cuda") < 0.01
    return torch.where(outliers, w * 30, w)


def _relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.double() - reference).norm() / reference.norm()).item()


@pytest.fixture(scope="module")
def kernels():
    module = dispatch.triton_w4()
    if module is None:
        pytest.skip("triton is not installed")
    return module


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f.kind}{f.num_bits}-{f.block_size}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequantize_kernel_is_bitwise_formats(kernels, fmt, dtype):
    generator = torch.Generator(device="cuda").manual_seed(1)
    weight = _weight(96, 512, generator).to(dtype)
    packed = quantize_weight(weight, fmt)
    arguments = dispatch.triton_arguments(packed)
    out = kernels.w4_dequantize(packed.codes, packed.scale, dtype=dtype, **arguments)
    assert torch.equal(out, packed.dequantize(dtype))


# every format and every launch path at least once, without compiling the full product
MATMUL_CASES = [
    (FORMATS[0], "gemv", 1, torch.bfloat16), (FORMATS[0], "gemv", 1, torch.float16),
    (FORMATS[0], "gemv-split", 1, torch.bfloat16), (FORMATS[0], "mma", 16, torch.bfloat16),
    (FORMATS[0], "mma-split", 5, torch.float16), (FORMATS[0], "mma-large", 130, torch.bfloat16),
    (FORMATS[1], "mma", 3, torch.bfloat16), (FORMATS[2], "gemv", 1, torch.bfloat16),
    (FORMATS[2], "mma-large", 130, torch.float16), (FORMATS[3], "mma", 3, torch.bfloat16),
    (FORMATS[4], "gemv", 1, torch.bfloat16), (FORMATS[5], "gemv", 1, torch.bfloat16),
    (FORMATS[5], "mma-split", 5, torch.bfloat16), (FORMATS[6], "mma-large", 130, torch.bfloat16),
    (FORMATS[7], "gemv", 1, torch.bfloat16), (FORMATS[7], "gemv-split", 1, torch.float16),
    (FORMATS[7], "mma", 16, torch.bfloat16), (FORMATS[7], "mma", 130, torch.bfloat16),
]


@pytest.mark.parametrize("fmt, config_name, rows, dtype", MATMUL_CASES,
                         ids=lambda v: getattr(v, "kind", None) or str(v))
def test_matmul_matches_float64(kernels, fmt, config_name, rows, dtype):
    generator = torch.Generator(device="cuda").manual_seed(2)
    n, k = 200, 1024  # N not a multiple of the tile: exercises the masks
    weight = _weight(n, k, generator).to(dtype)
    packed = quantize_weight(weight, fmt)
    x = torch.randn(rows, k, generator=generator, device="cuda").to(dtype)
    bias = torch.randn(n, generator=generator, device="cuda").to(dtype)
    reference = x.double() @ packed.dequantize(dtype).double().T + bias.double()
    arguments = dispatch.triton_arguments(packed)
    config = CONFIGS[config_name]
    out = kernels.w4_matmul(x, packed.codes, packed.scale, bias=bias, config=config, **arguments)
    floor = _relative_error(reference.to(dtype), reference)  # the output's own rounding
    tolerance = (4 if config["SPLIT_K"] > 1 else 1.5) * floor + 1e-5
    assert out.dtype == dtype and out.shape == (rows, n)
    assert _relative_error(out, reference) <= tolerance


def test_wgmma_tiles_refuse_groups_of_16(kernels):
    packed = quantize_weight(torch.randn(64, 256, device="cuda"), FORMATS[7])
    x = torch.randn(130, 256, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="BLOCK_M"):
        arguments = dispatch.triton_arguments(packed)
        kernels.w4_matmul(x, packed.codes, packed.scale, config=CONFIGS["mma-large"], **arguments)


@pytest.mark.parametrize("rows", [1, 7, 64, 1024])
def test_dispatch_autotuned_paths(rows):
    generator = torch.Generator(device="cuda").manual_seed(3)
    weight = _weight(384, 2048, generator).to(torch.bfloat16)
    packed = quantize_weight(weight, WeightFormat("int", 4, block_size=128))
    x = torch.randn(2, rows, 2048, generator=generator, device="cuda").to(torch.bfloat16)
    reference = x.double() @ packed.dequantize(torch.bfloat16).double().T
    out = dispatch.weight_only_linear(x, packed, None)
    floor = _relative_error(reference.to(torch.bfloat16), reference)
    assert out.shape == (2, rows, 384)
    assert _relative_error(out, reference) <= 4 * floor
