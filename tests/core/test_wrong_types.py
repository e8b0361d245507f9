"""Wrong types at the door: every quantizer attribute and algorithm option checks its type (a bool is not a
string or an int, a float is not an int), and quantize() raises naming the key before the model is touched."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.algorithms.registry import DEFAULT_OPTIONS

from .helpers import assert_untouched, mlp, snapshot


def _calibration(model) -> None:
    model(torch.randn(4, 64, generator=torch.Generator().manual_seed(0)))


def _quantize_raises(config: dict, error: type[Exception], message: str) -> None:
    model = mlp()
    before = snapshot(model)
    with pytest.raises(error, match=message):
        lowbit.quantize(model, config, forward_loop=_calibration)
    assert_untouched(model, before)


# (attributes for "*weight_quantizer", the key the message must name)
WRONG_ATTRIBUTES = [
    ({"num_bits": 8, "enable": "yes"}, "enable='yes'"),
    ({"enable": "yes"}, "enable='yes'"),  # an enable-only rule is checked too
    ({"num_bits": 8, "enable": 1}, "enable=1"),
    ({"num_bits": 8.0}, "num_bits=8.0"),
    ({"num_bits": "8"}, "num_bits='8'"),
    ({"num_bits": (4.0, 3)}, r"num_bits=\(4.0, 3\)"),
    ({"num_bits": (4, 3, 0)}, r"num_bits=\(4, 3, 0\)"),
    ({"num_bits": [True, 1]}, r"num_bits=\[True, 1\]"),
    ({"num_bits": 8, "axis": 0.0}, "axis=0.0"),
    ({"num_bits": 8, "axis": True}, "axis=True"),
    ({"num_bits": 8, "axis": "0"}, "axis='0'"),
    ({"num_bits": 4, "block_sizes": [-1, 16]}, "block_sizes="),
    ({"num_bits": 4, "block_sizes": {-1: 16.0}}, r"block_sizes\[-1\]=16.0"),
    ({"num_bits": 4, "block_sizes": {-1: True}}, r"block_sizes\[-1\]=True"),
    ({"num_bits": 4, "block_sizes": {"-1": 16}}, "block_sizes key '-1'"),
    ({"num_bits": 4, "block_sizes": {True: 16}}, "block_sizes key True"),
    ({"num_bits": (2, 1), "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": 8}},
     r"block_sizes\['scale_bits'\]=8"),
    ({"num_bits": 4, "block_sizes": {-1: 16, "scale_block_sizes": 16}}, "scale_block_sizes"),
    ({"num_bits": 8, "unsigned": "False"}, "unsigned='False'"),
    ({"num_bits": 8, "narrow_range": 0}, "narrow_range=0"),
    ({"num_bits": 8, "asymmetric": None}, "asymmetric=None"),
    ({"num_bits": 8, "learn_amax": "no"}, "learn_amax='no'"),
    ({"num_bits": 8, "fake_quant": 1}, "fake_quant=1"),
    ({"num_bits": 8, "calibrator": 3}, "calibrator=3"),
    ({"num_bits": 8, "calibrator": {"percentile": 99.9}}, "calibrator=.*'method'"),
    ({"num_bits": 8, "calibrator": {"method": "percentile", "percentile": "99"}}, "calibrator=.*percentile"),
    ({"num_bits": 8, "calibrator": {"method": "mse", "num_steps": 31.0}}, "calibrator=.*num_steps"),
    ({"num_bits": 8, "trt_high_precision_dtype": 16}, "trt_high_precision_dtype=16"),
]


@pytest.mark.parametrize(("attributes", "message"), WRONG_ATTRIBUTES, ids=[m for _, m in WRONG_ATTRIBUTES])
def test_wrong_typed_attribute_names_the_rule_and_key(attributes, message):
    config = {"quant_cfg": {"*weight_quantizer": attributes, "default": {"enable": False}}, "algorithm": "max"}
    _quantize_raises(config, (TypeError, ValueError), r"quant_cfg\['\*weight_quantizer'\].*" + message)


def test_the_same_attributes_in_the_list_form_and_in_code():
    _quantize_raises({"quant_cfg": [{"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 8}, "enable": "on"}]},
                     TypeError, r"quant_cfg\[0\]\['enable'\]='on'")
    _quantize_raises({"quant_cfg": [{"quantizer_name": 7, "cfg": {"num_bits": 8}}]}, TypeError, "quantizer_name")
    _quantize_raises({"quant_cfg": [{"quantizer_name": "*", "cfg": {"num_bits": 8}, "parent_class": 1}]}, TypeError,
                     "parent_class")
    _quantize_raises({"quant_cfg": {"nn.Linear": {3: {"num_bits": 8}}}}, TypeError, r"quant_cfg\['nn.Linear'\] key 3")
    with pytest.raises(TypeError, match="learn_amax=1"):
        lowbit.QuantizerAttributeConfig(num_bits=8, learn_amax=1)


def _wrong_values(default) -> list:
    """Values of the wrong type for an option whose default is ``default`` (int is accepted for a float)."""
    if isinstance(default, bool):
        return ["yes", 1]
    if isinstance(default, int):
        return [float(default), True, str(default)]
    if isinstance(default, float):
        return [True, str(default)]
    return [1, None]


WRONG_OPTIONS = [(method, key, value) for method, options in DEFAULT_OPTIONS.items()
                 for key, default in options.items() for value in _wrong_values(default)]


@pytest.mark.parametrize(("method", "key", "value"), WRONG_OPTIONS,
                         ids=[f"{m}-{k}-{v!r}" for m, k, v in WRONG_OPTIONS])
def test_wrong_typed_algorithm_option_names_the_option(method, key, value):
    config = {"quant_cfg": {"*weight_quantizer": {"num_bits": 4, "block_sizes": {-1: 16}}},
              "algorithm": {"method": method, key: value}}
    _quantize_raises(config, TypeError, f"algorithm '{method}': {key}={value!r}: expected")


@pytest.mark.parametrize(("option", "message"), [
    ({"steps": 1.0}, "scale_estimation: steps=1.0"),
    ({"objective": 2}, "scale_estimation: objective=2"),
    ({"min_ratio": "0.5"}, "scale_estimation: min_ratio='0.5'"),
    ({"ratio": 0.5}, r"scale_estimation got unknown options \['ratio'\]"),
])
def test_chained_scale_estimation_options_are_checked_too(option, message):
    config = {"quant_cfg": {"*weight_quantizer": {"num_bits": 4, "block_sizes": {-1: 16}}},
              "algorithm": {"method": "gptq", "scale_estimation": option}}
    _quantize_raises(config, (TypeError, ValueError), message)


def test_options_for_max_are_unknown_rather_than_ignored():
    config = {"quant_cfg": {"*weight_quantizer": {"num_bits": 8}}, "algorithm": {"method": "max", "alpha": 0.5}}
    _quantize_raises(config, ValueError, r"algorithm 'max' got unknown options \['alpha'\]")


def test_right_types_still_pass():
    """The strict checks keep the accepted spellings: lists for tuples, ints for float options, None sizes."""
    config = {"quant_cfg": {"*weight_quantizer": {"num_bits": [4, 3], "axis": [0]},
                            "*input_quantizer": {"num_bits": 8, "block_sizes": {-1: None, "type": "dynamic"}},
                            "default": {"enable": False}},
              "algorithm": {"method": "smoothquant", "alpha": 1}}
    parsed = lowbit.parse_config(config)
    assert parsed.algorithm_options == {"alpha": 1}
    weight = parsed.attributes_for("fc1.weight_quantizer", ("Linear",))
    assert (weight.num_bits, weight.axis) == ((4, 3), (0,))
    assert parsed.attributes_for("fc1.input_quantizer", ("Linear",)).block_sizes == {-1: None, "type": "dynamic"}
