"""lowbit.save / lowbit.restore: identical outputs after a round trip (bit-exact), for several presets
including W4A8 (SequentialQuantizer), FP8 KV, learn_amax and asymmetric; clear errors for a wrong
path and a wrong architecture."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import lowbit

from .helpers import mlp, small_cnn, tiny_llama, token_batches

LEARN_AMAX_ASYM = {
    "quant_cfg": {
        "*weight_quantizer": {"num_bits": 4, "block_sizes": {-1: 32}, "learn_amax": True},
        "*input_quantizer": {"num_bits": 8, "asymmetric": True},
        "*[kv]_bmm_quantizer": {"num_bits": (4, 3)},
        "*lm_head*": {"enable": False},
        "default": {"enable": False},
    },
    "algorithm": "max",
}
CONFIGS = {
    "INT8_DEFAULT": lowbit.INT8_DEFAULT_CFG,
    "W4A8_AWQ_BETA": lowbit.W4A8_AWQ_BETA_CFG,
    "NVFP4_DEFAULT": lowbit.NVFP4_DEFAULT_CFG,
    "MXFP8_DEFAULT": lowbit.MXFP8_DEFAULT_CFG,
    "FP8_KV": lowbit.FP8_KV_CFG,
    "learn_amax+asymmetric": LEARN_AMAX_ASYM,
}


@pytest.fixture(scope="module")
def tokens():
    calibration = token_batches(512, count=1)
    return calibration, token_batches(512, count=1, seed=3)[0]


def _quantized_llama(config: dict, calibration) -> nn.Module:
    model = tiny_llama()
    config = copy.deepcopy(config)
    try:
        lowbit.quantize(model, config, lambda m: [m(b) for b in calibration])
    except NotImplementedError:  # algorithm not available: the checkpoint is about the quantizers
        model = tiny_llama()
        lowbit.quantize(model, {**config, "algorithm": "max"}, lambda m: [m(b) for b in calibration])
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_gives_identical_outputs(tmp_path, tokens, name):
    calibration, test_tokens = tokens
    model = _quantized_llama(CONFIGS[name], calibration)
    with torch.no_grad():
        expected = model(test_tokens).logits
    path = lowbit.save(model, tmp_path / "checkpoint")
    assert (path / "lowbit_quant_state.json").is_file() and (path / "model.safetensors").is_file()
    json.loads((path / "lowbit_quant_state.json").read_text())  # plain JSON, no pickle

    restored = lowbit.restore(lambda: tiny_llama(seed=1), path)  # other weights: all must come from disk
    with torch.no_grad():
        assert torch.equal(restored(test_tokens).logits, expected)
    original = dict(lowbit.iter_quantizers(model))
    for quantizer_name, quantizer in lowbit.iter_quantizers(restored):
        assert type(quantizer) is type(original[quantizer_name])
        assert quantizer.is_enabled == original[quantizer_name].is_enabled, quantizer_name


def test_sequential_and_learnable_state_survive(tmp_path, tokens):
    calibration, _ = tokens
    model = _quantized_llama(LEARN_AMAX_ASYM, calibration)
    restored = lowbit.restore(tiny_llama(seed=1), lowbit.save(model, tmp_path / "c"))
    up = restored.model.layers[0].mlp.up_proj
    assert isinstance(up.weight_quantizer.amax, nn.Parameter), "learn_amax comes back trainable"
    assert torch.equal(up.input_quantizer.amin, model.model.layers[0].mlp.up_proj.input_quantizer.amin)

    w4a8 = _quantized_llama(lowbit.W4A8_AWQ_BETA_CFG, calibration)
    restored = lowbit.restore(tiny_llama(seed=1), lowbit.save(w4a8, tmp_path / "w4a8"))
    stages = restored.model.layers[1].self_attn.o_proj.weight_quantizer
    assert isinstance(stages, lowbit.SequentialQuantizer)
    assert [s.config.num_bits for s in stages] == [4, (4, 3)]


def test_round_trip_on_a_cnn_restored_in_place(tmp_path):
    model = small_cnn()
    x = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(0))
    lowbit.quantize(model, lowbit.get_preset("INT8_DEFAULT"), lambda m: m(x))
    lowbit.disable_quantizer(model, "conv1d.input_quantizer")  # switches are part of the state
    with torch.no_grad():
        expected = model(x)
    restored = lowbit.restore(small_cnn(seed=5), lowbit.save(model, tmp_path / "cnn"))
    assert not restored.conv1d.input_quantizer.is_enabled
    with torch.no_grad():
        assert torch.equal(restored(x), expected)


def test_restore_from_a_wrong_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="lowbit_quant_state.json"):
        lowbit.restore(mlp(), tmp_path / "nothing_here")


def test_restore_into_a_wrong_architecture(tmp_path):
    model = lowbit.quantize(mlp(), lowbit.get_preset("INT8_WEIGHT_ONLY"))
    path = lowbit.save(model, tmp_path / "mlp")
    with pytest.raises(ValueError, match="architecture"):
        lowbit.restore(small_cnn(), path)
    with pytest.raises((ValueError, RuntimeError), match="fc1"):
        lowbit.restore(mlp(width=32), path)  # same names, other shapes


def test_save_an_unquantized_model_errors(tmp_path):
    with pytest.raises(ValueError, match="quantize"):
        lowbit.save(mlp(), tmp_path / "plain")
