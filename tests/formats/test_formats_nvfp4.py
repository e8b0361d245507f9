"""NVFP4 vs a per-block float64 loop written from ModelOpt's definition.

Tolerance: block scales and element values equal the reference exactly, except where a float64
quotient lies within 2**-18 (relative) of a rounding tie (float32 may land on the other side; a
flipped block scale excludes its whole block). Dequantized values match to 1e-6 relative.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.formats import decode_e2m1, dequantize_nvfp4, fake_quant_nvfp4, quantize_nvfp4

from .reference import E2M1_TABLE, E4M3_TABLE, midpoints, near_a_midpoint, nearest_in_table, random_with_outliers


def nvfp4_reference(x: torch.Tensor, global_amax: float | None = None, block_size: int = 16):
    """(element values, block scales, global scale, decided mask) in float64, one block at a time."""
    rows = x.double().reshape(-1, x.shape[-1])
    amax = rows.abs().max().item() if global_amax is None else global_amax
    global_scale = amax / (6 * 448) if amax > 2**-24 else 1.0
    elements, scales, decided = torch.zeros_like(rows), [], torch.ones_like(rows, dtype=torch.bool)
    for r in range(rows.shape[0]):
        for start in range(0, rows.shape[1], block_size):
            block = rows[r, start : start + block_size]
            block_max = block.abs().max().item()
            raw_scale = torch.tensor(1.0 if block_max == 0 else block_max / (6 * global_scale), dtype=torch.float64)
            scale = nearest_in_table(raw_scale, E4M3_TABLE).item()
            scales.append(scale)
            span = slice(start, start + block_size)
            if scale * global_scale == 0:
                continue
            quotient = block / (scale * global_scale)
            elements[r, span] = nearest_in_table(quotient, E2M1_TABLE)
            decided[r, span] = ~near_a_midpoint(quotient, midpoints(E2M1_TABLE))
            if near_a_midpoint(raw_scale, midpoints(E4M3_TABLE)).item():
                decided[r, span] = False
    n_blocks = x.shape[-1] // block_size
    block_scales = torch.tensor(scales, dtype=torch.float64).reshape(*x.shape[:-1], n_blocks)
    return elements.reshape(x.shape), block_scales, global_scale, decided.reshape(x.shape)


def make_input(shape, seed):
    generator = torch.Generator().manual_seed(seed)
    x = random_with_outliers(shape, generator)
    x.view(-1, shape[-1])[1, :16] = 0.0  # a zero block
    x.view(-1, shape[-1])[2, 16:32] *= 1e-6  # a block far below the global amax
    return x


@pytest.mark.parametrize("global_amax_factor", [None, 0.5, 2.0])
@pytest.mark.parametrize("shape", [(8, 64), (3, 5, 32)])
def test_quantize_nvfp4_matches_block_loop(shape, global_amax_factor):
    x = make_input(shape, seed=len(shape))
    global_amax = None if global_amax_factor is None else x.abs().amax().item() * global_amax_factor
    elements, block_scales, global_scale, decided = nvfp4_reference(x, global_amax)

    codes, block_scale, global_scale_out = quantize_nvfp4(x, None if global_amax is None else torch.tensor(global_amax))
    assert codes.dtype == torch.uint8 and codes.shape == x.shape and codes.max() <= 15
    assert block_scale.dtype == torch.float8_e4m3fn and block_scale.shape == (*shape[:-1], shape[-1] // 16)
    assert global_scale_out.dtype == torch.float32 and global_scale_out.dim() == 0
    torch.testing.assert_close(global_scale_out.double().item(), global_scale, rtol=1e-6, atol=0)

    block_decided = decided.reshape(*shape[:-1], -1, 16).all(dim=-1)
    assert torch.equal(block_scale.double()[block_decided], block_scales[block_decided])
    assert torch.equal(decode_e2m1(codes).double()[decided], elements[decided])
    assert decided.float().mean() > 0.99

    expected = elements * block_scales.repeat_interleave(16, dim=-1) * global_scale
    result = fake_quant_nvfp4(x, global_amax)
    torch.testing.assert_close(result.double()[decided], expected[decided], rtol=1e-6, atol=0)
    assert torch.equal(dequantize_nvfp4(codes, block_scale, global_scale_out), result)


def test_zero_block_stores_unit_scale_and_zero_codes():
    x = make_input((4, 32), seed=9)
    codes, block_scale, _ = quantize_nvfp4(x)
    assert block_scale[1, 0].float().item() == 1.0  # ModelOpt sets a zero block's scale to 1
    assert codes[1, :16].eq(0).all()


def test_all_zero_tensor_is_zero_not_nan():
    codes, block_scale, global_scale = quantize_nvfp4(torch.zeros(2, 32))
    assert global_scale.item() == 1.0 and codes.eq(0).all()
    assert fake_quant_nvfp4(torch.zeros(2, 32)).eq(0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_input_returns_input_dtype(dtype):
    x = make_input((4, 32), seed=4).to(dtype)
    result = fake_quant_nvfp4(x)
    assert result.dtype == dtype
    assert torch.equal(result, fake_quant_nvfp4(x.float()).to(dtype))


def test_errors():
    with pytest.raises(ValueError, match="block_size 16 must divide the length 40"):
        quantize_nvfp4(torch.ones(2, 40))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        quantize_nvfp4(torch.ones(2, 32, dtype=torch.int32))
    with pytest.raises(TypeError, match="global_amax"):
        quantize_nvfp4(torch.ones(2, 32), torch.tensor(3))
    codes, block_scale, global_scale = quantize_nvfp4(torch.ones(2, 32))
    with pytest.raises(ValueError, match=r"block_scale of shape \(2, 2\) must be"):
        dequantize_nvfp4(codes[:, :25], block_scale, global_scale)
    with pytest.raises(ValueError, match="block_scale"):
        dequantize_nvfp4(codes[:1], block_scale, global_scale)
    with pytest.raises(TypeError, match="codes"):
        dequantize_nvfp4(codes.float(), block_scale, global_scale)
