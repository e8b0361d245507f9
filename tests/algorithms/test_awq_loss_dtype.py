"""AWQ's scale search with its loss products in bfloat16 (``loss_dtype``), against a float64 brute force over
the same candidates written here; the option is checked at the door."""

import pytest
import torch

import lowbit
from lowbit.algorithms.awq import alpha_grid, normalised_weight_mean, search_awq_scale
from tests.algorithms.test_awq import GROUP, brute_force_losses, inputs_with_outlier_channels, int4_groups
from tests.algorithms.tiny_llama import tiny_llama


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bfloat16_losses_follow_the_float64_brute_force(seed):
    """Each candidate's loss within 1 % of float64 (bf16 keeps 8 bits of D; the sum averages the rounding), and
    the chosen alpha's float64 loss within 0.5 % of the best one: a swap only between near-equal candidates."""
    generator = torch.Generator().manual_seed(seed)
    x = inputs_with_outlier_channels(generator, rows=512)
    weights = [torch.randn(48, 32, generator=generator), torch.randn(16, 32, generator=generator)]
    weights[0][3, 7] = 12.0  # an outlier weight
    mean = x.abs().mean(0)
    w_mean = normalised_weight_mean(weights, GROUP)
    alphas = alpha_grid(0.1)
    best, _, losses = search_awq_scale(x.T @ x, x.shape[0], weights, [int4_groups, int4_groups], mean, alphas,
                                       w_mean, torch.bfloat16)
    brute = brute_force_losses(x, weights, mean, alphas, w_mean)
    for alpha in brute:
        assert losses[alpha] == pytest.approx(brute[alpha], rel=1e-2)
    assert brute[best] <= min(brute.values()) * 1.005


def test_loss_dtype_is_checked_before_the_model_changes():
    model = tiny_llama()
    config = {"quant_cfg": {"*weight_quantizer": {"num_bits": 4, "block_sizes": {-1: 32}}},
              "algorithm": {"method": "awq_lite", "loss_dtype": "float16"}}
    with pytest.raises(ValueError, match=r"awq_lite.*loss_dtype='float16'; allowed: \['float32', 'bfloat16'\]"):
        lowbit.quantize(model, config, lambda m: None)
    assert not any(lowbit.modules.is_quantized(m) for m in model.modules())
