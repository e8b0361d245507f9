"""The layer-wise algorithms on a tiny Llama (random weights, outlier activation channels)."""

import copy

import pytest
import torch

import lowbit.convert as convert
from lowbit.algorithms.registry import ALGORITHMS, run_algorithm
from lowbit.presets import get_preset

from .tiny_llama import forward_loop_for, logits


def quantized(model, preset, batches, block=16):
    config = get_preset(preset)
    for value in config["quant_cfg"].values():
        if isinstance(value, dict) and "block_sizes" in value:
            value["block_sizes"] = {**value["block_sizes"], -1: block}
    config["algorithm"] = None
    result = copy.deepcopy(model)
    convert.quantize(result, config, forward_loop_for(batches))
    return result


def test_registry_names():
    assert sorted(ALGORITHMS) == ["autoround", "awq_clip", "awq_full", "awq_lite", "block_scale_search", "gptq", "hqq",
                                  "lora_correction", "lsq", "max", "scale_estimation", "smoothquant", "svdquant"]


def test_smoothquant_scales_follow_the_formula(model, batches):
    smoothed = quantized(model, "INT8_SMOOTHQUANT_CFG", batches)
    run_algorithm("smoothquant", smoothed, forward_loop_for(batches), {"alpha": 0.5})

    layer, original = smoothed.model.layers[0], model.model.layers[0]
    captured = []
    handle = original.input_layernorm.register_forward_hook(lambda _m, _a, out: captured.append(out))
    logits(model, batches)
    handle.remove()
    activation_amax = torch.cat([c.reshape(-1, 64) for c in captured]).abs().amax(0).double()
    weights = [getattr(original.self_attn, n).weight.double() for n in ("q_proj", "k_proj", "v_proj")]
    weight_amax = torch.cat(weights).abs().amax(0)
    scale = activation_amax**0.5 / weight_amax**0.5

    # q, k, v share input_layernorm: 1/s is folded into it, s into their weights
    torch.testing.assert_close(layer.input_layernorm.weight.double(),
                               original.input_layernorm.weight.double() / scale, rtol=1e-5, atol=0)
    torch.testing.assert_close(layer.self_attn.q_proj.weight.double(), weights[0] * scale, rtol=1e-5, atol=0)
    assert layer.self_attn.q_proj.input_quantizer.pre_quant_scale is None
    # o_proj's input comes from attention, not a norm: 1/s stays in its input quantizer
    o_proj, original_o = layer.self_attn.o_proj, original.self_attn.o_proj
    ratio = (o_proj.weight / original_o.weight).mean(0) * o_proj.input_quantizer.pre_quant_scale
    torch.testing.assert_close(ratio, torch.ones(64), rtol=1e-4, atol=0)


@pytest.mark.parametrize(
    ("preset", "algorithm"), [("INT8_SMOOTHQUANT_CFG", "smoothquant"), ("INT4_AWQ_CFG", "awq_lite")]
)
def test_scaling_keeps_the_float_function(model, batches, preset, algorithm):
    scaled = quantized(model, preset, batches)
    run_algorithm(algorithm, scaled, forward_loop_for(batches), {})
    convert.disable_quantizer(scaled, "*")
    torch.testing.assert_close(logits(scaled, batches), logits(model, batches), rtol=1e-4, atol=1e-4)


def test_gptq_beats_max_calibration_layer_by_layer(model, batches):
    rtn = quantized(model, "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", batches)
    convert.calibrate(rtn, "max", forward_loop_for(batches))
    gptq = quantized(model, "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", batches)
    report = run_algorithm("gptq", gptq, forward_loop_for(batches), {"block_size": 32})
    assert len(report) == 2
    for entry in report:
        assert entry.mse_after < entry.mse_max, entry

    reference = logits(model, batches)
    gptq_error = float((logits(gptq, batches) - reference).square().mean())
    rtn_error = float((logits(rtn, batches) - reference).square().mean())
    assert gptq_error < rtn_error
    for module in gptq.modules():  # the weights sit on the grid of the amax GPTQ stored
        if isinstance(module, torch.nn.Linear) and module.weight_quantizer.is_enabled:
            torch.testing.assert_close(module.weight_quantizer(module.weight), module.weight, rtol=0, atol=1e-6)


def test_awq_full_scales_and_clips(model, batches):
    awq = quantized(model, "INT4_AWQ_CFG", batches)
    report = run_algorithm("awq_full", awq, forward_loop_for(batches), {"alpha_step": 0.25, "max_clip_tokens": 64})
    assert all(torch.isfinite(torch.tensor([r.mse_max, r.mse_after])).all() for r in report)
    q_proj = awq.model.layers[0].self_attn.q_proj
    assert q_proj.input_quantizer.pre_quant_scale is None  # folded into input_layernorm
    group_max = q_proj.weight.detach().abs().reshape(q_proj.out_features, -1, 16).amax(-1, keepdim=True)
    amax = q_proj.weight_quantizer.amax
    assert amax.shape == group_max.shape
    assert torch.all(amax <= group_max * (1 + 1e-6)) and torch.all(amax >= 0.5 * group_max * (1 - 1e-6))


def test_through_quantize(model, batches):
    config = get_preset("INT4_BLOCKWISE_WEIGHT_ONLY_CFG")
    config["quant_cfg"]["*weight_quantizer"]["block_sizes"] = {-1: 16}
    config["algorithm"] = {"method": "gptq", "percdamp": 0.05}
    result = convert.quantize(copy.deepcopy(model), config, forward_loop_for(batches))
    assert torch.isfinite(logits(result, batches)).all()


def test_errors_leave_the_model_untouched(model, batches):
    loop = forward_loop_for(batches)
    target = quantized(model, "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", batches)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=r"allowed: \[.*'awq_clip'"):
        run_algorithm("awq", target, loop, {})
    with pytest.raises(ValueError, match="unknown options"):
        run_algorithm("gptq", target, loop, {"damp": 0.1})
    with pytest.raises(ValueError, match="forward_loop is None"):
        run_algorithm("awq_lite", target, None, {})
    with pytest.raises(ValueError, match="static_groups"):
        run_algorithm("gptq", target, loop, {"act_order": True})
    with pytest.raises(ValueError, match="percdamp"):
        run_algorithm("gptq", target, loop, {"percdamp": -1})
    nvfp4 = quantized(model, "W4A16_NVFP4_CFG", batches)
    with pytest.raises(ValueError, match="static_groups"):  # NVFP4 blocks are GPTQ groups (gptq_micro)
        run_algorithm("gptq", nvfp4, loop, {"act_order": True})
    with pytest.raises(ValueError, match="ModuleList"):
        run_algorithm("gptq", torch.nn.Sequential(torch.nn.Linear(4, 4)), loop, {})
    after = target.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def asymmetric(model, batches, block=16):
    """INT4 weight-only with min/max grids (zero point), block ``block``."""
    config = get_preset("INT4_BLOCKWISE_WEIGHT_ONLY_CFG")
    config["quant_cfg"]["*weight_quantizer"] = {"num_bits": 4, "asymmetric": True, "block_sizes": {-1: block}}
    config["algorithm"] = None
    result = copy.deepcopy(model)
    convert.quantize(result, config, forward_loop_for(batches))
    return result


def assert_weights_on_grid(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight_quantizer.is_enabled:
            torch.testing.assert_close(module.weight_quantizer(module.weight), module.weight, rtol=0, atol=1e-6)


@pytest.mark.parametrize("grid", ["symmetric", "asymmetric"])
def test_scale_estimation_lowers_every_layer_error(model, batches, grid):
    target = quantized(model, "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", batches) if grid == "symmetric" else asymmetric(
        model, batches)
    report = run_algorithm("scale_estimation", target, forward_loop_for(batches), {"ratio_step": 0.05})
    assert [r.mse_after < r.mse_max for r in report] == [True, True], report
    if grid == "asymmetric":
        quantizer = target.model.layers[0].self_attn.q_proj.weight_quantizer
        assert quantizer.amin is not None and torch.all(quantizer.amin <= 0)


@pytest.mark.parametrize("grid", ["symmetric", "asymmetric"])
def test_gptq_keeps_the_estimated_grid(model, batches, grid):
    """GPTQ after scale estimation: the weights sit on the stored (estimated) grid, and the layer errors
    are below plain GPTQ's on this model."""
    make = (lambda: quantized(model, "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", batches)) if grid == "symmetric" else (
        lambda: asymmetric(model, batches))
    chained, plain = make(), make()
    report = run_algorithm("gptq", chained, forward_loop_for(batches), {"scale_estimation": {"ratio_step": 0.05}})
    plain_report = run_algorithm("gptq", plain, forward_loop_for(batches), {})
    assert_weights_on_grid(chained)
    assert sum(r.mse_after for r in report) < sum(r.mse_after for r in plain_report)


def test_awq_then_scale_estimation(model, batches):
    """awq_lite + scale estimation: the float function is unchanged, the quantized layers beat awq_lite's."""
    chained, plain = quantized(model, "INT4_AWQ_CFG", batches), quantized(model, "INT4_AWQ_CFG", batches)
    report = run_algorithm("awq_lite", chained, forward_loop_for(batches), {"scale_estimation": True})
    plain_report = run_algorithm("awq_lite", plain, forward_loop_for(batches), {})
    assert [a.mse_after <= b.mse_after for a, b in zip(report, plain_report, strict=True)] == [True, True]
    convert.disable_quantizer(chained, "*")
    torch.testing.assert_close(logits(chained, batches), logits(model, batches), rtol=1e-4, atol=1e-4)


def test_scale_estimation_option_errors_leave_the_model_untouched(model, batches):
    loop = forward_loop_for(batches)
    target = quantized(model, "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", batches)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=r"scale_estimation got unknown options \['ratio'\]"):
        run_algorithm("gptq", target, loop, {"scale_estimation": {"ratio": 0.5}})
    with pytest.raises(TypeError, match="scale_estimation='yes'"):
        run_algorithm("awq_lite", target, loop, {"scale_estimation": "yes"})
    with pytest.raises(ValueError, match="min_ratio=1.5"):
        run_algorithm("scale_estimation", target, loop, {"min_ratio": 1.5})
    with pytest.raises(ValueError, match="steps=-1"):
        run_algorithm("awq_full", target, loop, {"scale_estimation": {"steps": -1}})
    with pytest.raises(ValueError, match="objective='full'"):
        run_algorithm("scale_estimation", target, loop, {"objective": "full"})
    with pytest.raises(ValueError, match="unknown options"):
        run_algorithm("awq_clip", target, loop, {"scale_estimation": True})
    nvfp4 = quantized(model, "W4A16_NVFP4_CFG", batches)
    with pytest.raises(ValueError, match="static integer weight quantizer"):
        run_algorithm("awq_lite", nvfp4, loop, {"scale_estimation": True})
    after = target.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_awq_scale_per_linear(model, batches):
    """Each of q, k, v gets its own pre_quant_scale (nothing folded into the norm); the float function stays."""
    scaled = quantized(model, "INT4_AWQ_CFG", batches)
    norm_before = scaled.model.layers[0].input_layernorm.weight.detach().clone()
    run_algorithm("awq_lite", scaled, forward_loop_for(batches), {"scale_per_linear": True, "alpha_step": 0.25})
    attention = scaled.model.layers[0].self_attn
    scales = [getattr(attention, n).input_quantizer.pre_quant_scale for n in ("q_proj", "k_proj", "v_proj")]
    assert all(s is not None for s in scales) and not torch.equal(scales[0], scales[2])
    assert torch.equal(scaled.model.layers[0].input_layernorm.weight, norm_before)
    convert.disable_quantizer(scaled, "*")
    torch.testing.assert_close(logits(scaled, batches), logits(model, batches), rtol=1e-4, atol=1e-4)
    with pytest.raises(TypeError, match="scale_per_linear=1"):
        run_algorithm("awq_lite", quantized(model, "INT4_AWQ_CFG", batches), forward_loop_for(batches),
                      {"scale_per_linear": 1})


def test_config_accepts_exactly_the_registered_algorithms():
    from lowbit.algorithms.registry import ALGORITHMS
    from lowbit.config import ALGORITHM_METHODS

    assert sorted(ALGORITHM_METHODS) == sorted(ALGORITHMS)


@pytest.mark.parametrize("reads_output", [False, True])
def test_weight_only_capture_stops_at_the_first_layer_unless_the_loop_needs_outputs(model, batches, reads_output):
    from lowbit.algorithms.layerwise import capture_layer_inputs

    weight_only = quantized(model, "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", batches)
    head_calls = []
    handle = weight_only.lm_head.register_forward_hook(lambda *args: head_calls.append(1))

    def loop(m):
        for batch in batches:
            output = m(batch)
            if reads_output:
                output.logits.sum()

    try:
        inputs = capture_layer_inputs(weight_only, weight_only.model.layers[0], loop)
    finally:
        handle.remove()
    assert len(head_calls) == (len(batches) if reads_output else 0)
    assert len(inputs) == len(batches)
    for index, batch in enumerate(batches):
        embedded = weight_only.model.embed_tokens(batch)
        torch.testing.assert_close(inputs.hidden_states(index), embedded, rtol=0, atol=0)


@pytest.mark.parametrize("output_quantizer", [False, True])
def test_layerwise_input_ranges_without_a_full_pass(model, batches, output_quantizer):
    """W4A8 + awq_lite: every activation quantizer is a per-tensor max input quantizer of a decoder-layer
    linear, so the forward loop stops at the first layer (lm_head never runs) and each input amax comes
    from the layer's measured channel maxima; the first layer's q/k/v read norm(embedding), whatever is
    quantized, so their amax is max |norm(embedding) * pre_quant_scale| over the batches (float64).
    A static output quantizer needs the full max-calibration pass (lm_head runs once per batch)."""
    config = get_preset("W4A8_AWQ_BETA_CFG")
    config["quant_cfg"]["*weight_quantizer"][0]["block_sizes"] = {-1: 16, "type": "static"}
    if output_quantizer:
        config["quant_cfg"]["*mlp.down_proj.output_quantizer"] = {"num_bits": 8, "axis": None}
    config["algorithm"] = None
    scaled = copy.deepcopy(model)
    convert.quantize(scaled, config, forward_loop_for(batches))
    head_calls = []
    handle = scaled.lm_head.register_forward_hook(lambda *args: head_calls.append(1))
    try:
        run_algorithm("awq_lite", scaled, forward_loop_for(batches), {"scale_per_linear": True, "alpha_step": 0.25})
    finally:
        handle.remove()
    assert len(head_calls) == (len(batches) if output_quantizer else 0)

    layer = model.model.layers[0]
    with torch.no_grad():
        normed = torch.cat([layer.input_layernorm(model.model.embed_tokens(b)).reshape(-1, 64) for b in batches])
    attention = scaled.model.layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj"):
        quantizer = getattr(attention, name).input_quantizer
        expected = (normed.double() * quantizer.pre_quant_scale.double()).abs().amax()
        torch.testing.assert_close(quantizer.amax.double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("layer_inputs", ["float", "quantized"])
def test_layer_inputs_float_or_quantized(model, batches, layer_inputs):
    """With "float" every decoder layer is calibrated on the float model's hidden states (the reference:
    transformers' output_hidden_states of the unquantized model); with "quantized" the second layer sees
    the first quantized layer's outputs instead, which differ from them."""
    from lowbit.algorithms.layerwise import run_layerwise

    weight_only = quantized(model, "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", batches)
    seen = []
    run_layerwise(weight_only, forward_loop_for(batches),
                  lambda layer, inputs: seen.append([inputs.hidden_states(i) for i in range(len(inputs))]),
                  "record", layer_inputs=layer_inputs)
    with torch.no_grad():
        expected = [model(batch, output_hidden_states=True).hidden_states for batch in batches]
    for index in range(len(seen)):
        for batch_index, hidden in enumerate(seen[index]):
            close = torch.allclose(hidden, expected[batch_index][index], rtol=1e-5, atol=1e-5)
            assert close == (layer_inputs == "float" or index == 0), (index, batch_index)


def test_layer_inputs_error_leaves_the_model_untouched(model, batches):
    scaled = quantized(model, "INT4_AWQ_CFG", batches)
    before = copy.deepcopy(scaled.state_dict())
    allowed = "\\['float', 'quantized', 'quantized_float_targets'\\]"
    with pytest.raises(ValueError, match=f"layer_inputs='sequential'; allowed: {allowed}"):
        run_algorithm("awq_lite", scaled, forward_loop_for(batches), {"layer_inputs": "sequential"})
    after = scaled.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if isinstance(before[k], torch.Tensor))
