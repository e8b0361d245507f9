"""``layer_inputs="quantized_float_targets"``: each block sees the quantized model's inputs and is given the float
model's outputs as its targets, checked against a float64 forward written from the definitions."""

import pytest
import torch

import lowbit
from lowbit.algorithms.autoround import autoround_layer, step_batches
from lowbit.algorithms.layerwise import run_layerwise
from lowbit.structure.inputs import LayerInputs

from .test_autoround import TwoBlocks, int_config, outlier_data
from .tiny_llama import forward_loop_for

WIDTH, GROUP = 64, 32


def fake_quant_int4_float64(w):
    """INT4 symmetric per group of ``GROUP`` input columns with max calibration: ``s = 7 / max|w|``,
    ``w_hat = round_half_even(w s) / s`` (``|w s| <= 7``, so no clamp is reached)."""
    groups = w.double().reshape(w.shape[0], -1, GROUP)
    scale = 7.0 / groups.abs().amax(dim=-1, keepdim=True)
    return (torch.round(groups * scale) / scale).reshape(w.shape)


def block_float64(block, x, quantized):
    first, second = block[0], block[2]
    w1, w2 = (layer.weight.detach().double() for layer in (first, second))
    b1, b2 = (layer.bias.detach().double() for layer in (first, second))
    if quantized:
        w1, w2 = fake_quant_int4_float64(w1), fake_quant_int4_float64(w2)
    hidden = torch.nn.functional.gelu(x @ w1.T + b1)
    return hidden @ w2.T + b2


def record_blocks(layer_inputs, batches):
    model = lowbit.quantize(TwoBlocks(WIDTH, seed=11), int_config(False))  # max-calibrated INT4 g32 weights
    seen = []

    def record(layer, inputs):
        seen.append((inputs.hidden_states(0).detach().clone(),
                     None if inputs.targets is None else inputs.targets[0].detach().clone()))

    run_layerwise(model, forward_loop_for(batches), record, "record", layer_inputs=layer_inputs)
    return model, seen


def test_blocks_see_quantized_inputs_and_float_targets_float64():
    _, x = outlier_data(WIDTH, WIDTH, tokens=96, seed=12)
    batches = [x.float().reshape(2, 48, WIDTH)]
    model, seen = record_blocks("quantized_float_targets", batches)
    floating, quantized = batches[0].double(), batches[0].double()
    for layer, (inputs, targets) in zip(model.layers, seen, strict=True):
        torch.testing.assert_close(inputs.double(), quantized, rtol=1e-5, atol=1e-5)
        floating = block_float64(layer, floating, quantized=False)
        torch.testing.assert_close(targets.double(), floating, rtol=1e-5, atol=1e-5)
        quantized = block_float64(layer, quantized, quantized=True)
    # the second block's quantized inputs differ from the float ones: the test can tell the streams apart
    assert (seen[1][0].double() - block_float64(model.layers[0], batches[0].double(), False)).abs().max() > 1e-3


@pytest.mark.parametrize("layer_inputs", ["float", "quantized"])
def test_other_layer_inputs_give_no_targets(layer_inputs):
    _, x = outlier_data(WIDTH, WIDTH, tokens=96, seed=13)
    _, seen = record_blocks(layer_inputs, [x.float().reshape(2, 48, WIDTH)])
    assert [targets for _, targets in seen] == [None, None]


def test_layer_inputs_errors_name_the_value():
    with pytest.raises(ValueError, match=r"layer_inputs='floats'.*quantized_float_targets"):
        lowbit.parse_config({**int_config(False), "algorithm": {"method": "autoround", "layer_inputs": "floats"}})
    config = {**int_config(False), "algorithm": {"method": "gptq", "layer_inputs": "quantized_float_targets"}}
    with pytest.raises(ValueError, match="quantize_layerwise: layer_inputs='quantized_float_targets'"):
        lowbit.quantize_layerwise("/nonexistent", config, [], "/nonexistent-out")


def test_autoround_minibatches_cycle_through_the_batches():
    # batches_per_step k: step t takes batches t k .. t k + k - 1 mod n (written out for n = 4)
    assert [step_batches(t, 1, 4) for t in range(5)] == [[0], [1], [2], [3], [0]]
    assert [step_batches(t, 3, 4) for t in range(3)] == [[0, 1, 2], [3, 0, 1], [2, 3, 0]]
    assert step_batches(7, 0, 4) == step_batches(7, 4, 4) == step_batches(7, 9, 4) == [0, 1, 2, 3]


def test_autoround_minibatch_loss_is_the_chosen_batches_mse_float64():
    """With batches_per_step=1 and lr tiny enough that no rounding moves, the best loss autoround_layer returns is
    the least over steps of the block's output MSE on step t's batch: here min over the 2 batches, in float64."""
    _, x = outlier_data(WIDTH, WIDTH, tokens=96, seed=14)
    batches = [x.float().reshape(2, 48, WIDTH)[i : i + 1] for i in range(2)]
    model = lowbit.quantize(TwoBlocks(WIDTH, seed=15), int_config(False))
    block = model.layers[0]
    inputs = LayerInputs([((batch,), {}) for batch in batches])
    per_batch = [float((block_float64(block, b.double(), True) - block_float64(block, b.double(), False))
                       .square().mean()) for b in batches]  # before autoround_layer replaces the weights
    loss = autoround_layer(block, inputs, iterations=3, lr=1e-9, minmax_lr=0.0, batches_per_step=1)
    assert abs(per_batch[0] - per_batch[1]) > 1e-3 * per_batch[0]  # the batches tell the steps apart
    assert loss == pytest.approx(min(per_batch), rel=1e-4)
