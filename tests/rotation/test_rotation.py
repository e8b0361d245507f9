"""Hadamard transforms and QuaRot against float64 references written here: explicit Sylvester and Kronecker
matrices, orthogonality of the random rotation, and the bundled Llama's logits unchanged by the fused
rotations (1e-4 relative)."""

import copy

import pytest
import torch

from lowbit.assets import load_default_model, load_gpt2_model
from lowbit.rotation import RandomHadamard, fwht, hadamard_multiply, rotate
from lowbit.rotation.hadamard import hadamard_factors, paley_matrix


def sylvester(n):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def test_fwht_matches_explicit_sylvester_matrix():
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[0, 0, 3] = 1e4  # an outlier
    torch.testing.assert_close(fwht(x), x @ sylvester(64), rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("order", [4, 12, 20, 24, 44])
def test_paley_matrices_are_hadamard(order):
    h = paley_matrix(order)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(h @ h.T, order * torch.eye(order, dtype=torch.float64), rtol=0, atol=0)


@pytest.mark.parametrize("n", [768, 320, 96])
def test_hadamard_multiply_matches_kronecker_product(n):
    small, power = hadamard_factors(n)
    assert small * power == n and small > 1
    explicit = torch.kron(paley_matrix(small), sylvester(power))
    x = torch.randn(7, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    torch.testing.assert_close(hadamard_multiply(x), x @ explicit, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(hadamard_multiply(x, transpose=True), x @ explicit.T, rtol=1e-12, atol=1e-9)


def test_random_hadamard_is_orthogonal_and_seeded():
    rotation = RandomHadamard(768, seed=3)
    eye = torch.eye(768, dtype=torch.float64)
    matrix = rotation.right(eye)  # rows of I times R: R itself
    torch.testing.assert_close(matrix @ matrix.T, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(rotation.right_transposed(eye), matrix.T, rtol=0, atol=1e-15)
    assert not torch.equal(RandomHadamard(768, seed=4).right(eye), matrix)


def test_unsupported_sizes_are_named():
    with pytest.raises(ValueError, match="size 7"):
        RandomHadamard(7)
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.ones(6))


def test_rotated_bundled_llama_keeps_its_logits():
    model, tokenizer = load_default_model()
    ids = torch.tensor([tokenizer.encode("The quick brown fox jumps over the lazy dog, twice. " * 6)])
    with torch.no_grad():
        reference = model(ids).logits
        rotated = rotate(copy.deepcopy(model), seed=1)
        logits = rotated(ids).logits
    relative = (logits - reference).norm() / reference.norm()
    assert relative < 1e-4, float(relative)
    # the rotations did change the weights (and flattened the residual stream's outliers)
    before = model.model.embed_tokens.weight
    after = rotated.model.embed_tokens.weight
    assert (after - before).abs().max() > 1e-2
    assert after.abs().amax() / after.std() < before.abs().amax() / before.std()


def test_rotation_refuses_layer_norm_models():
    model, _ = load_gpt2_model()
    with pytest.raises(ValueError, match="rotation: GPT2LMHeadModel has no model.embed_tokens"):
        rotate(model)


def test_rotate_option_of_any_algorithm_rotates_before_calibration():
    import lowbit

    model, tokenizer = load_default_model()
    ids = torch.tensor([tokenizer.encode("Numbers 12, 345 and a word or two. " * 6)])
    with torch.no_grad():
        reference = model(ids).logits
    config = lowbit.get_preset("INT4_BLOCKWISE_WEIGHT_ONLY_CFG")
    config["algorithm"] = {"method": "max", "rotate": {"seed": 2}}
    quantized = lowbit.quantize(copy.deepcopy(model), config)
    assert quantized.model.layers[0].mlp.down_proj._forward_pre_hooks, "the online rotation is installed"
    lowbit.disable_quantizer(quantized, "*")
    with torch.no_grad():
        logits = quantized(ids).logits
    assert (logits - reference).norm() / reference.norm() < 1e-4
    with pytest.raises(ValueError, match="rotate got unknown options \\['sede'\\]"):
        lowbit.parse_config({**config, "algorithm": {"method": "max", "rotate": {"sede": 1}}})


def test_saving_or_exporting_an_online_rotation_is_refused(tmp_path):
    import lowbit

    model, _ = load_default_model()
    config = lowbit.get_preset("INT4_BLOCKWISE_WEIGHT_ONLY_CFG")
    config["algorithm"] = {"method": "max", "rotate": True}
    lowbit.quantize(model, config)
    with pytest.raises(ValueError, match="lowbit.save: model.layers.0.mlp.down_proj rotates its input online"):
        lowbit.save(model, tmp_path / "saved")
    with pytest.raises(ValueError, match="export to hf: model.layers.0.mlp.down_proj"):
        lowbit.export(model, tmp_path / "exported", "hf")
