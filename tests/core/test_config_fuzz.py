"""Fuzzed config dicts: a few hundred seeded random configs (real and unknown attribute keys, values of right and
wrong types, wildcard patterns, algorithms) on a one-layer Llama. Each either quantizes to finite outputs, or
raises ValueError / TypeError whose message names a key of the config and leaves the model as it was."""

from __future__ import annotations

import copy
import dataclasses
import random
import warnings

import pytest
import torch

import lowbit

from .helpers import assert_untouched, snapshot, tiny_llama

CONFIGS = 300
WRONG = 0.08  # chance that a value (or an algorithm) is drawn from the wrong ones
# attribute: (right values, wrong values); the last two keys are not attributes at all
ATTRIBUTE_VALUES = {
    "num_bits": ([2, 4, 8, 8, (4, 3), (5, 2), (2, 1), [4, 3]], [1, 9, 8.0, "8", True, (3, 3), (4, 3, 1), None]),
    "axis": ([None, None, 0, -1, (0,), [0]], [2, 0.0, True, "0", ()]),
    "block_sizes": ([None, {-1: 16}, {-1: 8, "type": "dynamic"}, {-1: 16, "type": "dynamic", "scale_bits": (4, 3)},
                     {-1: 32, "type": "dynamic", "scale_bits": (8, 0)}, {-1: None, "type": "dynamic"}],
                    [{-1: 7}, {0: 4}, {-1: 0}, {-1: 16.0}, {"type": "static"}, [16], {-1: 16, "type": "often"}]),
    "unsigned": ([False], [True, "yes", 1]),
    "narrow_range": ([False, True], [None]),
    "asymmetric": ([False, True], ["true"]),
    "enable": ([True, True, False], ["yes", 1, None]),
    "fake_quant": ([True], [False, 1]),
    "calibrator": (["max", "percentile", "mse", {"method": "mse", "num_steps": 5},
                    {"method": "percentile", "percentile": 99.0}],
                   ["median", 3, {"percentile": 99.0}, {"method": "mse", "num_steps": 5.0}]),
    "learn_amax": ([False, True], ["no"]),
    "trt_high_precision_dtype": (["Half", "Float"], ["half", 16]),
    "num_bitz": ([], [8]),
    "scale": ([], [1.0]),
}
PATTERNS = ["*weight_quantizer", "*weight_quantizer", "*input_quantizer", "*output_quantizer", "*", "*mlp*",
            "*q_proj*", "*lm_head*", "default", "model.layers.0.*", "*[0-9]*", "??", "*[", "*k_bmm_quantizer"]
# mostly max: the layer-wise algorithms' own tests cover them; here they run now and then, and their wrong options
ALGORITHMS = ([None, None, *["max"] * 10, {"method": "max"}, {"method": "smoothquant", "alpha": 0.5},
               {"method": "gptq", "block_size": 16}, {"method": "awq_lite", "alpha_step": 0.5}],
              ["magic", {"alpha": 0.5}, 3, {"method": "gptq", "percdamp": "x"}, {"method": "gptq", "act_order": 1},
               {"method": "awq_clip", "max_clip_tokens": 64.0}, {"method": "smoothquant", "alpha": 2},
               {"method": "scale_estimation", "steps": 0.5}])


def draw(rng: random.Random, values: tuple[list, list]):
    right, wrong = values
    return copy.deepcopy(rng.choice(wrong if not right or rng.random() < WRONG else right))


def random_attributes(rng: random.Random) -> dict | bool:
    if rng.random() < 0.05:
        return rng.choice([True, False])
    keys = rng.sample([key for key, (right, _) in ATTRIBUTE_VALUES.items() if right], rng.randint(1, 4))
    if rng.random() < WRONG:
        keys.append(rng.choice(["num_bitz", "scale"]))
    return {key: draw(rng, ATTRIBUTE_VALUES[key]) for key in keys}


def random_config(rng: random.Random) -> dict:
    rules = {rng.choice(PATTERNS): random_attributes(rng) for _ in range(rng.randint(1, 3))}
    if rng.random() < 0.1:
        rules["nn.Linear"] = {rng.choice(PATTERNS): random_attributes(rng)}
    config = {"quant_cfg": rules}
    if rng.random() < 0.9:
        config["algorithm"] = draw(rng, ALGORITHMS)
    return config


ATTRIBUTE_NAMES = {field.name for field in dataclasses.fields(lowbit.QuantizerAttributeConfig)} - {"extra"}


def config_keys(value) -> set[str]:
    """Every dict key (as text) at any depth, plus the top-level names and every attribute name (an attribute
    left at its default can be the one a quantizer rejects): what an error may name."""
    keys = {"quant_cfg", "algorithm"} | ATTRIBUTE_NAMES
    if isinstance(value, dict):
        for key, inner in value.items():
            keys.add(str(key))
            keys |= config_keys(inner)
    return keys


@pytest.fixture(scope="module")
def float_model():
    return tiny_llama(num_layers=1, hidden=32)


def test_fuzzed_configs_quantize_to_finite_outputs_or_raise_naming_a_key(float_model):
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    outcomes, unnamed = {"quantized": 0, "raised": 0}, []
    for seed in range(CONFIGS):
        config = random_config(random.Random(seed))
        model = copy.deepcopy(float_model)
        before = snapshot(model)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # patterns that match nothing, quantizers that saw no data
                lowbit.quantize(model, copy.deepcopy(config), lambda m: m(tokens))
        except (ValueError, TypeError) as error:
            message = str(error)
            if not any(key in message for key in config_keys(config)):
                unnamed.append((seed, config, message))
            assert_untouched(model, before)
            outcomes["raised"] += 1
            continue
        with torch.no_grad():
            logits = model(tokens).logits
        assert torch.isfinite(logits).all(), (seed, config)
        outcomes["quantized"] += 1
    assert not unnamed, "\n".join(map(str, unnamed))
    assert min(outcomes.values()) > CONFIGS // 10, outcomes  # both paths were exercised
