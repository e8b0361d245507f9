"""Config shapes: ModelOpt dict (wildcards in order, later wins, "default" first, enable-only toggles,
filter functions, "nn.Linear" class keys), ModelOpt 0.4x ordered list, QuantizeConfig objects,
algorithm as a string / dict / None, and every preset parsing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit import QuantizeConfig, QuantizerAttributeConfig, QuantizeRule, parse_config

from .helpers import mlp, small_cnn

INT8_CHANNEL = {"num_bits": 8, "axis": 0}
INT4_BLOCK = {"num_bits": 4, "block_sizes": {-1: 16}}
INT4_CHANNEL = {"num_bits": 4, "axis": 0}


def _config(quant_cfg, algorithm="max") -> dict:
    return {"quant_cfg": quant_cfg, "algorithm": algorithm}


def _quantizers(model: nn.Module) -> dict:
    return dict(lowbit.iter_quantizers(model))


def _weight_only(quant_cfg) -> nn.Module:
    return lowbit.quantize(mlp(), _config(quant_cfg))


def test_later_rule_wins():
    quantizers = _quantizers(_weight_only({"*weight_quantizer": INT8_CHANNEL, "*fc2.weight_quantizer": INT4_BLOCK}))
    assert quantizers["fc1.weight_quantizer"].config == QuantizerAttributeConfig(**INT8_CHANNEL)
    assert quantizers["fc2.weight_quantizer"].config == QuantizerAttributeConfig(**INT4_BLOCK)

    quantizers = _quantizers(_weight_only({"*fc2.weight_quantizer": INT4_BLOCK, "*weight_quantizer": INT8_CHANNEL}))
    assert quantizers["fc2.weight_quantizer"].config == QuantizerAttributeConfig(**INT8_CHANNEL)


def test_default_applies_first_wherever_it_is_written():
    quantizers = _quantizers(_weight_only({"*weight_quantizer": INT8_CHANNEL, "default": {"enable": False}}))
    assert quantizers["fc1.weight_quantizer"].is_enabled
    assert not quantizers["fc1.input_quantizer"].is_enabled
    dynamic = {"num_bits": 4, "block_sizes": {-1: 16, "type": "dynamic"}}
    quantizers = _quantizers(_weight_only({"default": dynamic, "*weight_quantizer": INT8_CHANNEL}))
    assert quantizers["fc1.weight_quantizer"].config == QuantizerAttributeConfig(**INT8_CHANNEL)
    assert quantizers["fc1.input_quantizer"].config == QuantizerAttributeConfig(**dynamic)


def test_unnamed_quantizers_stay_disabled():
    quantizers = _quantizers(_weight_only({"*fc1.weight_quantizer": INT8_CHANNEL}))
    assert [name for name, q in quantizers.items() if q.is_enabled] == ["fc1.weight_quantizer"]


def test_enable_only_rules_toggle_and_keep_the_format():
    quant_cfg = {"*weight_quantizer": INT4_BLOCK, "*fc1*": {"enable": False}}
    quantizers = _quantizers(_weight_only(quant_cfg))
    assert not quantizers["fc1.weight_quantizer"].is_enabled
    assert quantizers["fc2.weight_quantizer"].is_enabled

    quant_cfg["*fc1.weight*"] = {"enable": True}  # toggled back on: the earlier format still applies
    quantizers = _quantizers(_weight_only(quant_cfg))
    assert quantizers["fc1.weight_quantizer"].is_enabled
    assert quantizers["fc1.weight_quantizer"].config == QuantizerAttributeConfig(**INT4_BLOCK)


def test_bool_value_is_an_enable_toggle():
    quantizers = _quantizers(_weight_only({"*weight_quantizer": INT8_CHANNEL, "*fc2*": False}))
    assert quantizers["fc1.weight_quantizer"].is_enabled
    assert not quantizers["fc2.weight_quantizer"].is_enabled


def test_filter_function_keys():
    quantizers = _quantizers(_weight_only({lambda name: name.startswith("fc2") and "weight" in name: INT4_BLOCK}))
    assert quantizers["fc2.weight_quantizer"].is_enabled
    assert not quantizers["fc1.weight_quantizer"].is_enabled


def test_module_class_keys_apply_inside_that_class_only():
    model = lowbit.quantize(small_cnn(), _config({"nn.Linear": {"*weight_quantizer": INT8_CHANNEL}}))
    quantizers = _quantizers(model)
    assert quantizers["head.weight_quantizer"].is_enabled
    assert not any(q.is_enabled for name, q in quantizers.items() if name != "head.weight_quantizer")

    model = lowbit.quantize(small_cnn(), _config({"nn.Conv2d": {"*weight_quantizer": INT8_CHANNEL}}))
    assert [name for name, q in _quantizers(model).items() if q.is_enabled] == ["conv2d.weight_quantizer"]


def test_ordered_list_form():
    quant_cfg = [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*weight_quantizer", "cfg": INT8_CHANNEL},
        {"quantizer_name": "*weight_quantizer", "cfg": INT4_CHANNEL, "parent_class": "nn.Conv2d"},
        {"quantizer_name": "*head*", "enable": False},
        {"quantizer_name": "*conv1d.input_quantizer", "cfg": {"num_bits": (4, 3)}, "enable": True},
    ]
    model = lowbit.quantize(small_cnn(), _config(quant_cfg), forward_loop=lambda m: m(torch.ones(1, 4, 64)))
    quantizers = _quantizers(model)
    assert quantizers["conv1d.weight_quantizer"].config == QuantizerAttributeConfig(**INT8_CHANNEL)
    assert quantizers["conv2d.weight_quantizer"].config == QuantizerAttributeConfig(**INT4_CHANNEL)
    assert quantizers["deconv.weight_quantizer"].config == QuantizerAttributeConfig(**INT8_CHANNEL)
    assert not quantizers["head.weight_quantizer"].is_enabled
    assert quantizers["conv1d.input_quantizer"].config.num_bits == (4, 3)
    assert quantizers["conv1d.input_quantizer"].amax is not None
    assert not quantizers["conv2d.input_quantizer"].is_enabled


def test_quantize_config_object():
    config = QuantizeConfig(
        rules=(QuantizeRule("*weight_quantizer", INT4_BLOCK), QuantizeRule("*fc2*", {"enable": False})),
        algorithm="max",
    )
    quantizers = _quantizers(lowbit.quantize(mlp(), config))
    assert quantizers["fc1.weight_quantizer"].config == QuantizerAttributeConfig(**INT4_BLOCK)
    assert not quantizers["fc2.weight_quantizer"].is_enabled
    assert parse_config(config) is config


@pytest.mark.parametrize("algorithm", ["max", {"method": "max"}])
def test_algorithm_string_or_dict_calibrates(algorithm):
    quantizers = _quantizers(_weight_only_with(algorithm))
    assert quantizers["fc1.weight_quantizer"].amax is not None
    assert parse_config(_config({"*weight_quantizer": INT8_CHANNEL}, algorithm)).algorithm == "max"


def test_algorithm_none_skips_calibration():
    quantizers = _quantizers(_weight_only_with(None))
    assert quantizers["fc1.weight_quantizer"].is_enabled
    assert quantizers["fc1.weight_quantizer"].amax is None


def test_algorithm_options_are_kept():
    config = parse_config(_config({"*weight_quantizer": INT4_BLOCK}, {"method": "awq_lite", "alpha_step": 0.25}))
    assert (config.algorithm, config.algorithm_options) == ("awq_lite", {"alpha_step": 0.25})


def _weight_only_with(algorithm) -> nn.Module:
    return lowbit.quantize(mlp(), _config({"*weight_quantizer": INT8_CHANNEL}, algorithm))


def test_a_list_value_makes_a_sequential_quantizer():
    model = _weight_only({"*weight_quantizer": [INT4_BLOCK, {"num_bits": (4, 3)}]})
    quantizer = _quantizers(model)["fc1.weight_quantizer"]
    assert isinstance(quantizer, lowbit.SequentialQuantizer)
    assert [stage.config.num_bits for stage in quantizer] == [4, (4, 3)]
    assert all(stage.amax is not None for stage in quantizer)


@pytest.mark.parametrize("name", sorted(lowbit.PRESETS))
def test_every_preset_parses(name):
    preset = lowbit.PRESETS[name]
    before = copy.deepcopy(preset)
    config = parse_config(preset)
    assert isinstance(config, QuantizeConfig) and config.rules
    assert preset == before, "parsing must not modify the preset"
    assert lowbit.get_preset(name) == preset
    assert lowbit.get_preset(name.lower().removesuffix("_cfg")) == preset
    assert lowbit.get_preset(name) is not preset, "get_preset returns a copy"


def test_presets_keep_the_head_in_high_precision():
    for name, preset in lowbit.PRESETS.items():
        config = parse_config(preset)
        assert config.attributes_for("lm_head.weight_quantizer", ("Linear",)) is None, name
        assert config.attributes_for("model.layers.0.mlp.router.input_quantizer", ("Linear",)) is None, name


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="INT8_DEFAULT_CFG"):
        lowbit.get_preset("INT3_MAGIC")
