"""SmoothQuant: the scale formula and the one-pass algorithm on a tiny Llama (float64 references)."""

import copy

import pytest
import torch

import lowbit.convert as convert
from lowbit.algorithms.layerwise import layer_errors
from lowbit.algorithms.smoothquant import DEFAULT_ALPHA, check_alpha, smoothquant, smoothquant_scale
from lowbit.calibration import calibration_pass
from lowbit.presets import get_preset

from .tiny_llama import forward_loop_for, logits

ATTENTION = ("q_proj", "k_proj", "v_proj")


def test_scale_equals_the_formula():
    generator = torch.Generator().manual_seed(3)
    activation = torch.rand(48, generator=generator, dtype=torch.float64) * 30 + 0.01
    weight = torch.rand(48, generator=generator, dtype=torch.float64) + 0.01
    for alpha in (0.0, 0.5, 0.85, 1.0):
        expected = activation**alpha / weight ** (1 - alpha)
        torch.testing.assert_close(smoothquant_scale(activation, weight, alpha).double(), expected, rtol=1e-6, atol=0)


def test_zero_channels_keep_scale_one_and_scales_are_clamped():
    activation = torch.tensor([0.0, 2.0, 3.0, 1e6, 1e-6])
    weight = torch.tensor([1.0, 0.0, 4.0, 1.0, 1.0])
    scale = smoothquant_scale(activation, weight, 0.5).tolist()
    assert scale == pytest.approx([1.0, 1.0, (3 / 4) ** 0.5, 1e3, 1e-3], rel=1e-6)
    assert smoothquant_scale(activation, weight, 1.0).tolist()[3:] == pytest.approx([1e4, 1e-4], rel=1e-6)


def test_errors():
    with pytest.raises(ValueError, match="in_features"):
        smoothquant_scale(torch.ones(3), torch.ones(4), 0.5)
    for alpha in (-0.1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="alpha"):
            check_alpha(alpha)


def test_default_alpha_is_modelopts():
    assert DEFAULT_ALPHA == 1.0


def quantized(model, batches, calibrator="max"):
    """INT8_SMOOTHQUANT_CFG's quantizers, not calibrated yet."""
    config = get_preset("INT8_SMOOTHQUANT_CFG")
    config["quant_cfg"]["*input_quantizer"]["calibrator"] = calibrator
    config["algorithm"] = None
    result = copy.deepcopy(model)
    convert.quantize(result, config, forward_loop_for(batches))
    return result


def captured_outputs(model, batches, modules):
    """{name: [output per call]} of ``modules`` (name -> module) while ``batches`` run, quantizers as they are."""
    outputs = {name: [] for name in modules}
    handles = [module.register_forward_hook(lambda _m, _a, out, name=name: outputs[name].append(out.detach()))
               for name, module in modules.items()]
    logits(model, batches)
    for handle in handles:
        handle.remove()
    return outputs


def channel_amax(tensors):
    return torch.cat([t.reshape(-1, t.shape[-1]) for t in tensors]).double().abs().amax(0)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_one_pass_scales_follow_the_formula_and_keep_the_float_output(model, batches, alpha):
    smoothed = quantized(model, batches)
    smoothquant(smoothed, forward_loop_for(batches), alpha)

    original = model.model.layers[0]
    norm_output = captured_outputs(model, batches, {"norm": original.input_layernorm})["norm"]
    weights = [getattr(original.self_attn, n).weight.double() for n in ATTENTION]
    scale = channel_amax(norm_output) ** alpha / torch.cat(weights).abs().amax(0) ** (1 - alpha)
    layer = smoothed.model.layers[0]
    torch.testing.assert_close(layer.input_layernorm.weight.double(),
                               original.input_layernorm.weight.double() / scale, rtol=1e-5, atol=0)
    for name, weight in zip(ATTENTION, weights, strict=True):
        torch.testing.assert_close(getattr(layer.self_attn, name).weight.double(), weight * scale, rtol=1e-5, atol=0)
        assert getattr(layer.self_attn, name).input_quantizer.pre_quant_scale is None  # folded into the norm
    assert layer.self_attn.o_proj.input_quantizer.pre_quant_scale is not None  # no norm before o_proj

    convert.disable_quantizer(smoothed, "*")
    torch.testing.assert_close(logits(smoothed, batches), logits(model, batches), rtol=1e-4, atol=1e-4)


def test_analytic_amax_is_the_max_of_the_smoothed_inputs(model, batches):
    smoothed = quantized(model, batches)
    smoothquant(smoothed, forward_loop_for(batches))
    linears = {name: module for name, module in smoothed.named_modules()
               if name.startswith("model.layers") and hasattr(module, "input_quantizer")}
    amax = {name: linear.input_quantizer.amax.clone() for name, linear in linears.items()}
    convert.disable_quantizer(smoothed, "*")  # the float model; input quantizers still apply pre_quant_scale
    seen = captured_outputs(smoothed, batches, {n: m.input_quantizer for n, m in linears.items()})
    assert len(linears) == 14
    for name in linears:
        expected = channel_amax(seen[name]).amax()
        torch.testing.assert_close(amax[name].double(), expected, rtol=1e-5, atol=0, msg=name)
        assert amax[name].dim() == 0


def test_other_calibrators_get_one_pass_on_the_smoothed_model(model, batches):
    smoothed = quantized(model, batches, calibrator={"method": "percentile", "percentile": 99.0})
    smoothquant(smoothed, forward_loop_for(batches))
    q_proj = smoothed.model.layers[1].self_attn.q_proj
    recalibrated = copy.deepcopy(smoothed)
    quantizer = recalibrated.model.layers[1].self_attn.q_proj.input_quantizer
    quantizer.reset_amax()
    calibration_pass(recalibrated, forward_loop_for(batches), [quantizer], float_model=True)
    torch.testing.assert_close(q_proj.input_quantizer.amax, quantizer.amax, rtol=0, atol=0)


def test_lowers_every_layer_error(model, batches):
    plain = quantized(model, batches)
    convert.calibrate(plain, "max", forward_loop_for(batches))
    smoothed = quantized(model, batches)
    report = smoothquant(smoothed, forward_loop_for(batches), report=True)
    before = layer_errors(plain, forward_loop_for(batches))
    assert [entry.mse_max for entry in report] == [None, None]
    assert [after.mse_after < 0.5 * max_only.mse_after for after, max_only in zip(report, before, strict=True)] == [
        True, True], (report, before)


def test_smoothing_twice_is_refused_before_any_change(model, batches):
    smoothed = quantized(model, batches)
    smoothquant(smoothed, forward_loop_for(batches))
    state = copy.deepcopy(smoothed.state_dict())
    with pytest.raises(ValueError, match="pre_quant_scale; smooth a model once"):
        smoothquant(smoothed, forward_loop_for(batches))
    with pytest.raises(ValueError, match="alpha"):
        smoothquant(quantized(model, batches), forward_loop_for(batches), alpha=2.0)
    for key, value in smoothed.state_dict().items():
        assert torch.equal(value, state[key]), key
