"""SVDQuant against float64 references written here: the low-rank split (reconstruction, Eckart-Young error from
NumPy's SVD), the float function unchanged by smoothing + split, a lower W4A4 NVFP4 error than round-to-nearest
on a model with outlier channels, the branch carried into compress() and refused by export."""

import copy

import numpy as np
import pytest
import torch

import lowbit
from lowbit.algorithms.layerwise import quantizers_disabled
from lowbit.algorithms.svdquant import low_rank_split
from lowbit.modules.low_rank import LowRankQuantLinear
from lowbit.presets import get_preset

from .tiny_llama import forward_loop_for, logits


def outlier_matrix(rows=48, columns=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, columns, generator=generator, dtype=torch.float64)
    w[:, torch.randperm(columns, generator=generator)[:3]] *= 30  # outlier columns (smoothed activations)
    return w


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_low_rank_split_is_the_best_rank_r_approximation(dtype, tolerance):
    w = outlier_matrix(seed=1)
    up, down, residual = low_rank_split(w.to(dtype), rank=5)
    assert up.shape == (48, 5) and down.shape == (5, 64) and up.dtype == dtype
    scale = float(w.abs().max())
    np.testing.assert_allclose((up.double() @ down.double() + residual.double()).numpy(), w.numpy(), rtol=0,
                               atol=tolerance * scale)
    singular = np.linalg.svd(w.numpy(), compute_uv=False)
    # Eckart-Young: ||W - L1 L2||_F^2 = sum of the squared singular values after the r-th; the largest left is s_6
    np.testing.assert_allclose(float(residual.double().square().sum()), float((singular[5:] ** 2).sum()),
                               rtol=10 * tolerance)
    np.testing.assert_allclose(np.linalg.svd(residual.double().numpy(), compute_uv=False)[0], singular[5],
                               rtol=10 * tolerance)
    assert residual.abs().max() < 0.5 * w.abs().max()  # the outlier columns went into the branch


def nvfp4(model, batches, algorithm):
    config = get_preset("NVFP4_DEFAULT_CFG")
    config["algorithm"] = algorithm
    return lowbit.quantize(copy.deepcopy(model), config, forward_loop_for(batches))


@pytest.fixture(scope="module")
def svdquant_model(model, batches):
    return nvfp4(model, batches, {"method": "svdquant", "rank": 8})


def test_svdquant_keeps_the_float_function_and_beats_rtn(model, batches, svdquant_model):
    reference = logits(model, batches)
    linears = [m for m in svdquant_model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, LowRankQuantLinear) and m.lora_a.shape[0] == 8 for m in linears)
    with quantizers_disabled(svdquant_model):
        unquantized = logits(svdquant_model, batches)
    torch.testing.assert_close(unquantized, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))
    rtn = nvfp4(model, batches, "max")
    rtn_error = (logits(rtn, batches) - reference).square().mean()
    svd_error = (logits(svdquant_model, batches) - reference).square().mean()
    assert svd_error < 0.8 * rtn_error, (float(svd_error), float(rtn_error))


def test_compress_carries_the_branch_and_export_refuses_it(batches, svdquant_model, tmp_path):
    fake = logits(svdquant_model, batches)
    compressed = lowbit.compress(copy.deepcopy(svdquant_model))
    torch.testing.assert_close(logits(compressed, batches), fake, rtol=1e-4, atol=1e-4 * float(fake.abs().max()))
    with pytest.raises(ValueError, match="low-rank float branch"):
        lowbit.export(svdquant_model, tmp_path / "hf", "hf")


def test_svdquant_errors_name_the_problem(model, batches, svdquant_model):
    with pytest.raises(ValueError, match="rank=0"):
        lowbit.parse_config({**get_preset("NVFP4_DEFAULT_CFG"), "algorithm": {"method": "svdquant", "rank": 0}})
    from lowbit.algorithms.registry import run_algorithm

    with pytest.raises(ValueError, match=r"model\.layers\.0\.\w+\.\w+: input_quantizer already has a pre_quant_scale"):
        run_algorithm("svdquant", copy.deepcopy(svdquant_model), forward_loop_for(batches), {})
