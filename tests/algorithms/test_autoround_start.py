"""AutoRound started from GPTQ (``start="gptq"``): the start offsets reproduce GPTQ's codes from the float weights
(float64, from the grid's definition), and with no room to move the result is GPTQ's."""

import copy
from functools import partial

import pytest
import torch

import lowbit
from lowbit.algorithms.autoround import Rounding, autoround_layer
from lowbit.algorithms.gptq import gptq_layer
from lowbit.algorithms.registry import _range_estimator
from lowbit.algorithms.scale_estimation import IntGrid
from lowbit.structure.inputs import LayerInputs

from .test_autoround import TwoBlocks, int_config, outlier_data


def grid_codes_float64(w, bits, asymmetric, amin, amax):
    """``(codes - zero, step)`` of round-to-nearest, written from the definitions: symmetric ``d = amax / qmax``,
    codes in ``[-2^(b-1), 2^(b-1) - 1]``; asymmetric ``d = (max(amax, 0) - min(amin, 0)) / (2^b - 1)``,
    ``z = round(-low / d)``, codes in ``[0, 2^b - 1]``."""
    if asymmetric:
        low, high = amin.clamp(max=0), amax.clamp(min=0)
        step = (high - low) / (2**bits - 1)
        zero = torch.round(-low / step)
        return torch.clamp(torch.round(w / step) + zero, 0, 2**bits - 1) - zero, step, zero
    step = amax / (2 ** (bits - 1) - 1)
    return torch.clamp(torch.round(w / step), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1), step, None


@pytest.mark.parametrize("asymmetric", [False, True])
def test_start_offsets_reproduce_the_given_codes_float64(asymmetric):
    bits, group = (3 if asymmetric else 4), 16
    w, _ = outlier_data(8, 64, seed=21)
    groups = w.reshape(8, -1, group)
    grid = IntGrid(bits, asymmetric=asymmetric)
    amin, amax = grid.own_range(groups)
    codes, step, zero = grid_codes_float64(groups, bits, asymmetric, amin, amax)
    generator = torch.Generator().manual_seed(22)
    shift = torch.randint(-2, 3, codes.shape, generator=generator).double()  # GPTQ moves codes, a few by 2 steps
    low, high = ((-zero, 2**bits - 1 - zero) if asymmetric else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1))
    target = torch.clamp(codes + shift, low, high)
    rounding = Rounding.start_at(grid, w, (amin, amax), group)
    rounding.start_from((target * step).reshape(8, 64))
    # V in [-1, 1] reaches round-to-nearest's code and its two neighbours; a target further away starts at the
    # neighbour on its side
    reachable = torch.clamp(target, codes - 1, codes + 1)
    got = rounding.quantized().detach().reshape(groups.shape)
    torch.testing.assert_close(got, reachable * step, rtol=0, atol=1e-12)
    assert (target != reachable).any() and (target != codes).float().mean() > 0.3  # both cases occur
    assert rounding.tunables(0.1, 0.1)[0][2:] == (-1.0, 1.0)


def test_gptq_start_without_steps_is_gptq():
    """With a learning rate too small to move a rounding, AutoRound from GPTQ keeps GPTQ's grid and codes, each
    brought within one step of the float weight's nearest code (float64 reference)."""
    _, x = outlier_data(64, 64, tokens=128, seed=23)
    batches = [x.float().reshape(2, 64, 64)]
    model = lowbit.quantize(TwoBlocks(64, seed=24), int_config(True))
    block = model.layers[0]
    inputs = LayerInputs([((batch,), {}) for batch in batches])
    alone, floating = copy.deepcopy(block), copy.deepcopy(block)
    gptq = partial(gptq_layer, estimate_range=_range_estimator(True))
    gptq(alone, inputs)
    autoround_layer(block, inputs, iterations=2, lr=1e-9, minmax_lr=0.0, start_pass=gptq)
    moved = 0
    for index in (0, 2):
        tuned, reference, float_weight = block[index], alone[index], floating[index].weight.detach().double()
        quantizer = reference.weight_quantizer
        torch.testing.assert_close(tuned.weight_quantizer.amax, quantizer.amax, rtol=0, atol=0)
        groups = float_weight.reshape(float_weight.shape[0], -1, 32)
        amin, amax = (bound.double().reshape(*groups.shape[:2], 1) for bound in (quantizer.amin, quantizer.amax))
        codes, step, zero = grid_codes_float64(groups, 3, True, amin, amax)
        gptq_codes = torch.round(reference.weight.detach().double().reshape(groups.shape) / step)
        nearest = torch.round(groups / step)  # before the clamp to the grid (scale estimation shrinks ranges)
        expected = torch.clamp(torch.clamp(gptq_codes, nearest - 1, nearest + 1), -zero, 7 - zero) * step
        torch.testing.assert_close(tuned.weight.detach().double().reshape(groups.shape), expected, rtol=0, atol=1e-6)
        moved += int((gptq_codes != codes).sum())
    assert moved > 100  # GPTQ's codes differ from round-to-nearest's: the start is not RTN's


def test_start_option_is_checked():
    with pytest.raises(ValueError, match=r"start='awq'; allowed: \['rtn', 'gptq'\]"):
        lowbit.parse_config({**int_config(False), "algorithm": {"method": "autoround", "start": "awq"}})
