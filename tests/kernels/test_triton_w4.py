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
FORMATS = {
    "int4-g128": WeightFormat("int", 4, block_size=128),
    "int4-g32": WeightFormat("int", 4, block_size=32),
    "int4-channel": WeightFormat("int", 4, per_channel=True),
    "uint4-g128": WeightFormat("int", 4, block_size=128, unsigned=True),
    "int3-g64": WeightFormat("int", 3, block_size=64),
    "asym-g128": WeightFormat("int_asym", 4, block_size=128),
    "asym-g64": WeightFormat("int_asym", 4, block_size=64),
    "nvfp4": WeightFormat("nvfp4", (2, 1), block_size=16),
}
CONFIGS = {  # explicit launches, one per code path
    "decode": dict(BLOCK_N=64, BLOCK_M=16, SPLIT_K=1, num_warps=4, num_stages=3, X_PERMUTED=False),
    "decode-split": dict(BLOCK_N=128, BLOCK_M=16, SPLIT_K=4, num_warps=4, num_stages=3, X_PERMUTED=False),
    "decode-unroll": dict(BLOCK_N=64, BLOCK_M=16, SPLIT_K=2, UNROLL=2, num_warps=2, num_stages=3, X_PERMUTED=True),
    "decode-32": dict(BLOCK_N=64, BLOCK_M=32, SPLIT_K=2, num_warps=4, num_stages=2, X_PERMUTED=False),
    "prefill": dict(BLOCK_N=128, BLOCK_M=64, SPLIT_K=1, num_warps=8, num_stages=3, X_PERMUTED=True),
    "prefill-split": dict(BLOCK_N=64, BLOCK_M=128, SPLIT_K=2, num_warps=4, num_stages=3, X_PERMUTED=True),
}


def _weight(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    w = torch.randn(n, k, generator=generator, device="cuda") * 0.05
    outliers = torch.rand(n, k, generator=generator, device="cuda") < 0.01
    return torch.where(outliers, w * 30, w)


def _relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.double() - reference).norm() / reference.norm()).item()


def _tolerance(reference: torch.Tensor, dtype: torch.dtype) -> float:
    """3x the output's own rounding: the kernels multiply the exact weight values (codes times scales) where the
    reference uses the dequantized weights rounded to ``dtype``, an error of the same size as the output's."""
    return 3 * _relative_error(reference.to(dtype), reference) + 1e-5


@pytest.fixture(scope="module")
def kernels():
    module = dispatch.triton_w4()
    if module is None:
        pytest.skip("triton is not installed")
    return module


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequantize_kernel_is_bitwise_formats(kernels, name, dtype):
    generator = torch.Generator(device="cuda").manual_seed(1)
    packed = quantize_weight(_weight(96, 512, generator).to(dtype), FORMATS[name])
    arguments = dispatch.triton_arguments(packed)
    for config in (None, dict(BLOCK_N=8, K_BLOCKS=4, num_warps=2)):
        out = kernels.w4_dequantize(packed.codes, packed.scale, dtype=dtype, config=config, **arguments)
        assert torch.equal(out, packed.dequantize(dtype))


MATMUL_CASES = [  # every format, launch path and dtype at least once, without compiling the full product
    ("int4-g128", "decode", 1, torch.bfloat16), ("int4-g128", "decode", 1, torch.float16),
    ("int4-g128", "decode-split", 1, torch.bfloat16), ("int4-g128", "decode-split", 16, torch.float16),
    ("int4-g128", "decode-unroll", 9, torch.bfloat16), ("asym-g64", "decode-unroll", 2, torch.float16),
    ("nvfp4", "decode-unroll", 16, torch.bfloat16),
    ("int4-g128", "decode-32", 20, torch.bfloat16), ("int4-g128", "prefill", 130, torch.bfloat16),
    ("int4-g128", "prefill-split", 300, torch.float16),
    ("int4-g32", "decode", 3, torch.bfloat16), ("int4-g32", "prefill", 130, torch.bfloat16),
    ("int4-channel", "decode-split", 1, torch.bfloat16), ("int4-channel", "prefill", 130, torch.float16),
    ("uint4-g128", "decode", 3, torch.bfloat16), ("int3-g64", "decode", 1, torch.bfloat16),
    ("asym-g128", "decode", 1, torch.bfloat16), ("asym-g128", "decode-split", 5, torch.float16),
    ("asym-g128", "prefill", 130, torch.bfloat16), ("asym-g64", "decode-32", 17, torch.bfloat16),
    ("nvfp4", "decode", 1, torch.bfloat16), ("nvfp4", "decode-split", 1, torch.float16),
    ("nvfp4", "decode-32", 16, torch.bfloat16), ("nvfp4", "prefill", 130, torch.bfloat16),
    ("nvfp4", "prefill-split", 200, torch.float16),
]


@pytest.mark.parametrize("name, config_name, rows, dtype", MATMUL_CASES, ids=str)
def test_matmul_matches_float64(kernels, name, config_name, rows, dtype):
    generator = torch.Generator(device="cuda").manual_seed(2)
    n, k = 200, 1024  # N not a multiple of the tile: exercises the masks
    packed = quantize_weight(_weight(n, k, generator).to(dtype), FORMATS[name])
    x = torch.randn(rows, k, generator=generator, device="cuda").to(dtype)
    bias = torch.randn(n, generator=generator, device="cuda").to(dtype)
    reference = x.double() @ packed.dequantize(dtype).double().T + bias.double()
    arguments = dispatch.triton_arguments(packed)
    config = {**CONFIGS[config_name], "SCALE_AFTER_DOT": arguments["group_size"] % 128 == 0 and name != "nvfp4"}
    for _ in range(2):  # split-K must leave its workspace and counters zeroed for the next call
        out = kernels.w4_matmul(x, packed.codes, packed.scale, bias=bias, config=config, **arguments)
        assert out.dtype == dtype and out.shape == (rows, n) and torch.isfinite(out).all()
        assert _relative_error(out, reference) <= _tolerance(reference, dtype)


GEMV_CONFIGS = {"gemv": dict(BLOCK_N=64, SPLIT_K=1, num_warps=4, num_stages=1),
                "gemv-split": dict(BLOCK_N=32, SPLIT_K=2, UNROLL=2, num_warps=2, num_stages=3)}


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("config_name", list(GEMV_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv_matches_float64(kernels, name, config_name, dtype):
    generator = torch.Generator(device="cuda").manual_seed(5)
    n, k = 200, 1024
    packed = quantize_weight(_weight(n, k, generator).to(dtype), FORMATS[name])
    x = (torch.randn(1, k, generator=generator, device="cuda") * 3).to(dtype)
    bias = torch.randn(n, generator=generator, device="cuda").to(dtype)
    reference = x.double() @ packed.dequantize(dtype).double().T + bias.double()
    arguments = dispatch.triton_arguments(packed)
    for _ in range(2):  # split-K must leave its workspace and counters zeroed for the next call
        out = kernels.w4_gemv(x, packed.codes, packed.scale, bias=bias, config=GEMV_CONFIGS[config_name],
                              **arguments)
        assert out.dtype == dtype and out.shape == (1, n) and torch.isfinite(out).all()
        assert _relative_error(out, reference) <= _tolerance(reference, dtype)


def test_gemv_chosen_for_long_k_ranges_only(kernels):
    assert kernels.prefers_gemv(28672, 8192)  # measured faster there (kernels_h100_notes.md)
    assert not kernels.prefers_gemv(4096, 4096) and not kernels.prefers_gemv(14336, 4096)


def test_gemv_refuses_several_rows_and_unknown_keys(kernels):
    packed = quantize_weight(torch.randn(64, 256, device="cuda"), FORMATS["int4-g128"])
    arguments = dispatch.triton_arguments(packed)
    with pytest.raises(ValueError, match="one activation row"):
        kernels.w4_gemv(torch.randn(2, 256, device="cuda", dtype=torch.bfloat16), packed.codes, packed.scale,
                        **arguments)
    with pytest.raises(ValueError, match="BLOCK_M"):
        kernels.w4_gemv(torch.randn(1, 256, device="cuda", dtype=torch.bfloat16), packed.codes, packed.scale,
                        config=dict(BLOCK_M=16), **arguments)


def test_scale_after_dot_per_weight_agree(kernels):
    """The two ways of applying INT scales (after the dot, or per weight before it) give the same product."""
    generator = torch.Generator(device="cuda").manual_seed(3)
    packed = quantize_weight(_weight(256, 2048, generator).to(torch.bfloat16), FORMATS["asym-g128"])
    x = torch.randn(4, 2048, generator=generator, device="cuda").to(torch.bfloat16)
    arguments = dispatch.triton_arguments(packed)
    after, before = (kernels.w4_matmul(x, packed.codes, packed.scale, config={**CONFIGS["decode"],
                                       "SCALE_AFTER_DOT": flag}, **arguments) for flag in (True, False))
    assert _relative_error(after, before.double()) < 4e-3


@pytest.mark.parametrize("config, message", [(dict(SCALE_AFTER_DOT=True), "SCALE_AFTER_DOT"),
                                             (dict(SPLIT_K=3), "SPLIT_K"), (dict(BLOCK_K=64), "BLOCK_K"),
                                             (dict(SPLIT_K=1, UNROLL=4), "UNROLL")])
def test_invalid_configs_are_refused(kernels, config, message):
    packed = quantize_weight(torch.randn(64, 256, device="cuda"), FORMATS["nvfp4"])
    x = torch.randn(2, 256, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=message):
        kernels.w4_matmul(x, packed.codes, packed.scale, config=config, **dispatch.triton_arguments(packed))


@pytest.mark.parametrize("name", ["int4-g128", "asym-g128", "nvfp4"])
@pytest.mark.parametrize("rows", [1, 7, 40, 300])
def test_dispatch_default_configs(name, rows):
    generator = torch.Generator(device="cuda").manual_seed(4)
    packed = quantize_weight(_weight(384, 2048, generator).to(torch.bfloat16), FORMATS[name])
    x = torch.randn(1, rows, 2048, generator=generator, device="cuda").to(torch.bfloat16)  # 1 row: the GEMV
    reference = x.double() @ packed.dequantize(torch.bfloat16).double().T
    out = dispatch.weight_only_linear(x, packed, None)
    assert out.shape == (1, rows, 384)
    assert _relative_error(out, reference) <= _tolerance(reference, torch.bfloat16)
