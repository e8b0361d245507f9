"""lowbit.formats.steps and W4A8's chain in a checkpoint's divisor form, against float64 references written here.

Float32 arithmetic is emulated in float64: a product or quotient of two float32 numbers computed in float64 and
rounded to float32 is the correctly rounded float32 result (float64 carries more than 2 * 24 + 2 bits), so the
references are exact and the comparisons are ``torch.equal``. The chain test uses bf16 weights, where the INT4
values over the FP8 step land exactly on E4M3 midpoints (the test asserts it finds some): there the order of the
float32 operations decides the code, and the contract is the checkpoint's order (``formats.steps`` docstring).
"""

from __future__ import annotations

import pytest
import torch

from lowbit import QuantizerAttributeConfig, SequentialQuantizer, TensorQuantizer, formats

from .reference import E4M3_TABLE, midpoints, nearest_in_table, random_with_outliers


def f32(x: torch.Tensor) -> torch.Tensor:
    """Round float64 to float32 and back: one IEEE float32 rounding of an exact float64 result."""
    return x.double().float().double()


def int_round(x: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Nearest integer, ties to even (written out, not torch.round), clamped."""
    floor = torch.floor(x)
    fraction = x - floor
    up = (fraction > 0.5) | ((fraction == 0.5) & (torch.remainder(floor, 2) == 1))
    return torch.clamp(floor + up.double(), qmin, qmax)


@pytest.mark.parametrize("fmt", ["e4m3", 4, 8])
def test_fake_quant_by_step_is_round_of_the_quotient_times_the_step(fmt):
    generator = torch.Generator().manual_seed(3)
    x = random_with_outliers((64, 96), generator)
    step = torch.tensor(x.abs().max().item() / (448.0 if fmt == "e4m3" else 2 ** (fmt - 1) - 1) * 0.8)
    quotient = f32(x.double() / step.double())
    if fmt == "e4m3":
        rounded = nearest_in_table(quotient, E4M3_TABLE)
        actual = formats.fake_quant_by_step(x, step, formats.E4M3)
    else:
        rounded = int_round(quotient, -(2 ** (fmt - 1)), 2 ** (fmt - 1) - 1)
        actual = formats.fake_quant_by_step(x, step, fmt)
    assert actual.dtype == torch.float32
    assert torch.equal(actual.double(), f32(rounded * step.double()))


def test_a_tiny_step_counts_as_one():
    x = torch.tensor([0.0, 1e-9, -3e-9])
    assert torch.equal(formats.fake_quant_by_step(x, torch.tensor(0.0), formats.E4M3), torch.zeros(3))
    assert torch.equal(formats.dequantize_by_step(torch.tensor([0.0, 2.0]), torch.tensor(0.0), 7.0),
                       torch.tensor([0.0, 2.0]))


def test_divisor_step_is_the_ieee_quotient():
    amax = random_with_outliers((1000,), torch.Generator().manual_seed(4)).abs() + 1e-3
    assert torch.equal(formats.divisor_step(amax, 7.0).double(), f32(amax.double() / 7.0))


@pytest.mark.parametrize("seed", [0, 1])
def test_w4a8_chain_on_bf16_weights_is_the_checkpoint_arithmetic(seed):
    """codes = round(fl(w / fl(a0 / 7))) (what the export packs); y = fl(code * fl(a0 / 7)) (the reload's INT4
    value); out = fl(e4m3(fl(y / fl(a1 / 448))) * fl(a1 / 448)). Before the fix the chain divided by the
    multiplicative scale instead (code / fl(7 / a0), y * fl(448 / a1)): at the exact midpoints this test finds,
    ~1/3 of them rounded to the other E4M3 neighbour (70 of 209 elements of the bundled model's q_proj)."""
    block = 64
    weight = random_with_outliers((128, 256), torch.Generator().manual_seed(seed), scale=0.02).clamp(-0.45, 0.45)
    weight[seed, 7] = 0.5  # the tensor's amax: a short significand, as the bundled model's 0.515625 = 33 / 64
    weight = weight.to(torch.bfloat16)
    chain = SequentialQuantizer(
        TensorQuantizer(QuantizerAttributeConfig(num_bits=4, block_sizes={-1: block, "type": "static"})),
        TensorQuantizer(QuantizerAttributeConfig(num_bits=(4, 3), axis=None)))
    chain.enable_calib()
    chain.disable_quant()
    chain(weight)
    chain.load_calib_amax()
    chain.disable_calib()
    chain.enable_quant()
    actual = chain(weight)

    w = weight.double().reshape(128, 256 // block, block)
    a0 = chain[0].amax.double().reshape(128, 256 // block, 1)
    a1 = chain[1].amax.double()
    codes = int_round(f32(w / f32(a0 / 7.0)), -8, 7)
    y = f32(codes * f32(a0 / 7.0)).reshape(128, 256)
    step2 = f32(a1 / 448.0)
    quotient = f32(y / step2)
    assert a1.item() == y.abs().max().item()  # the FP8 stage calibrated on the INT4 values it then rounds
    exact = (codes * a0 * 64.0 / a1).reshape(128, 256)  # code * (a0 / 7) / (a1 / 448) in real numbers
    ties = (exact.abs()[..., None] == midpoints(E4M3_TABLE)).any(-1)
    assert ties.sum() > 0, "no exact E4M3 midpoint: the data cannot tell the two float32 routes apart"
    expected = f32(nearest_in_table(quotient, E4M3_TABLE) * step2)
    assert actual.dtype == torch.bfloat16
    assert torch.equal(chain.fake_quant(weight.float()).double(), expected)
    assert torch.equal(actual, expected.to(torch.bfloat16))
