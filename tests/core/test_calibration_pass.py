"""Calibration passes: activations seen on the float model or through weights quantized once per pass,
and the quantizer switches they use (quantization_off, reusing_outputs). References in float64."""

from __future__ import annotations

import copy

import pytest
import torch

import lowbit
from lowbit import TensorQuantizer
from lowbit.calibration import calibrate_weights, calibration_pass, max_calibrate
from lowbit.quantizer import quantization_off, reusing_outputs

from .helpers import tiny_llama

INT8 = {"quant_cfg": {"*weight_quantizer": {"num_bits": 4, "axis": 0}, "*input_quantizer": {"num_bits": 8},
                      "*lm_head*": {"enable": False}},
        "algorithm": None}


def batches():
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(0, 512, (2, 16), generator=generator) for _ in range(3)]


def forward_loop(model):
    for batch in batches():
        model(batch)


def input_maxima(model) -> dict[str, torch.Tensor]:
    """max |x| (float64) over every call of every nn.Linear's input, by module name."""
    maxima: dict[str, torch.Tensor] = {}

    def record(name, x):
        amax = x.detach().double().abs().amax()
        maxima[name] = torch.maximum(maxima[name], amax) if name in maxima else amax

    handles = [m.register_forward_pre_hook(lambda _m, args, name=name: record(name, args[0]))
               for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        forward_loop(model)
    for handle in handles:
        handle.remove()
    return maxima


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def quantized(model):
    return lowbit.quantize(copy.deepcopy(model), INT8)


def assert_amax_equal(model, expected):
    checked = 0
    for name, module in model.named_modules():
        if hasattr(module, "input_quantizer") and module.input_quantizer.is_enabled:
            torch.testing.assert_close(module.input_quantizer.amax.double(), expected[name], rtol=1e-6, atol=0,
                                       msg=name)
            checked += 1
    assert checked == 14  # 7 linears in each of 2 layers


def test_float_model_pass_gives_the_float_activation_maxima(model):
    calibrated = quantized(model)
    calibrate_weights(calibrated)
    activations = [m.input_quantizer for m in calibrated.modules() if hasattr(m, "input_quantizer")
                   and m.input_quantizer.is_enabled]
    calibration_pass(calibrated, forward_loop, activations, float_model=True)
    assert_amax_equal(calibrated, input_maxima(model))


def test_max_calibration_sees_the_quantized_weights(model):
    calibrated = quantized(model)
    max_calibrate(calibrated, forward_loop)
    reference = lowbit.fold_weight(copy.deepcopy(calibrated))  # weights fake-quantized once, as at inference
    lowbit.disable_quantizer(reference, "*")
    assert_amax_equal(calibrated, input_maxima(reference))
    assert all(q._reused is None and q._quant for q in calibrated.modules() if isinstance(q, TensorQuantizer))


def test_reusing_outputs_recomputes_for_a_changed_input():
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(16, 32, generator=generator) * torch.linspace(0.1, 4, 32)
    quantizer = TensorQuantizer({"num_bits": 4, "axis": 0})
    calls = []
    quantizer.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad(), reusing_outputs([quantizer]):
        first = quantizer(weight)
        assert quantizer(weight) is first
        assert quantizer(weight.t().t()) is first  # a view of the same storage, same strides
        weight.mul_(2)  # in place: a new version
        second = quantizer(weight)
    torch.testing.assert_close(second, 2 * first)
    assert quantizer._reused is None
    with torch.no_grad():
        torch.testing.assert_close(quantizer(weight), second, rtol=0, atol=0)
    with torch.enable_grad(), reusing_outputs([quantizer]):  # no reuse when a graph may be built
        assert quantizer(weight) is not quantizer(weight)


def test_quantization_off_restores_each_previous_mode_even_on_error():
    on, off = TensorQuantizer({"num_bits": 8}), TensorQuantizer({"num_bits": 8})
    off.disable_quant()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1)) * 3
    with pytest.raises(RuntimeError, match="inside"), quantization_off([on, off]):
        assert torch.equal(on(x), x)
        raise RuntimeError("inside")
    assert on._quant and not off._quant
    assert not torch.equal(on(x), x)
