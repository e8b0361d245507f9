"""LoRA correction against float64 references written here: the fitted adapters reach the minimum of the damped
output error that NumPy's SVD of the whitened error gives, beat the unweighted truncated SVD and nearby
adapters, and on a model lower the output error of round-to-nearest with the branch carried by compress()."""

import copy

import numpy as np
import pytest
import torch

import lowbit
from lowbit.algorithms.lora_correction import lora_factors
from lowbit.modules.low_rank import LowRankQuantLinear
from lowbit.presets import get_preset

from .tiny_llama import forward_loop_for, logits


def error_and_inputs(rows=24, columns=40, tokens=200, seed=0):
    generator = torch.Generator().manual_seed(seed)
    residual = torch.randn(rows, columns, generator=generator, dtype=torch.float64) * 0.05
    x = torch.randn(tokens, columns, generator=generator, dtype=torch.float64)
    x[:, torch.randperm(columns, generator=generator)[:4]] *= 15  # outlier input channels
    return residual, x


def damped_error(residual, x, b, a, damp):
    """``||X R^T - X A^T B^T||^2 + d ||R - B A||^2`` in NumPy float64: the objective with GPTQ's damping."""
    delta = residual - b @ a
    return float(((x @ delta.T) ** 2).sum() + damp * (delta**2).sum())


@pytest.mark.parametrize("rank", [1, 4])
def test_lora_factors_reach_the_whitened_svd_minimum(rank):
    residual, x = error_and_inputs(seed=rank)
    percdamp = 0.01
    gram = x.T @ x
    damp = percdamp * float(np.trace(gram.numpy())) / gram.shape[0]
    b, a = lora_factors(residual, 2 * gram / x.shape[0], rank, percdamp)  # any positive multiple of X^T X
    assert b.shape == (24, rank) and a.shape == (rank, 40)
    r, xn = residual.numpy(), x.numpy()
    # the minimum: the tail of the squared singular values of R C, C C^T = X^T X + d I (Eckart-Young)
    c = np.linalg.cholesky(xn.T @ xn + damp * np.eye(40))
    singular = np.linalg.svd(r @ c, compute_uv=False)
    found = damped_error(r, xn, b.numpy(), a.numpy(), damp)
    np.testing.assert_allclose(found, float((singular[rank:] ** 2).sum()), rtol=1e-9)
    # better than the data-free truncated SVD of R, and than adapters nudged in any of 20 random directions
    u, s, vh = np.linalg.svd(r, full_matrices=False)
    assert found < damped_error(r, xn, u[:, :rank] * s[:rank], vh[:rank], damp)
    generator = np.random.default_rng(rank)
    for _ in range(20):
        nudged_b = b.numpy() + 1e-3 * generator.standard_normal(b.shape)
        nudged_a = a.numpy() + 1e-3 * generator.standard_normal(a.shape)
        assert found <= damped_error(r, xn, nudged_b, nudged_a, damp)


def int3(model, batches, algorithm):
    config = get_preset("INT3_BLOCKWISE_WEIGHT_ONLY_CFG")
    config["quant_cfg"]["*weight_quantizer"]["block_sizes"] = {-1: 32, "type": "static"}
    config["algorithm"] = algorithm
    return lowbit.quantize(copy.deepcopy(model), config, forward_loop_for(batches))


def test_lora_correction_lowers_the_error_of_rtn_and_compresses(model, batches):
    reference = logits(model, batches)
    corrected = int3(model, batches, {"method": "lora_correction", "rank": 4})
    linears = [m for m in corrected.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, LowRankQuantLinear) and m.lora_a.shape[0] == 4 for m in linears)
    rtn_error = (logits(int3(model, batches, "max"), batches) - reference).square().mean()
    fake = logits(corrected, batches)
    assert (fake - reference).square().mean() < 0.8 * rtn_error
    compressed = lowbit.compress(copy.deepcopy(corrected))
    torch.testing.assert_close(logits(compressed, batches), fake, rtol=1e-4, atol=1e-4 * float(fake.abs().max()))


def test_lora_correction_options_are_checked():
    config = get_preset("INT4_BLOCKWISE_WEIGHT_ONLY_CFG")
    with pytest.raises(ValueError, match="rank=0"):
        lowbit.parse_config({**config, "algorithm": {"method": "lora_correction", "rank": 0}})
    with pytest.raises(ValueError, match="percdamp=0"):
        lowbit.parse_config({**config, "algorithm": {"method": "lora_correction", "percdamp": 0.0}})
