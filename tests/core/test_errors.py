"""Bad input: each a clear error naming the parameter and value, and quantize() leaves the model
untouched (state_dict and module classes equal to before) whenever it raises."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lowbit
from lowbit import QuantizerAttributeConfig, TensorQuantizer

from .helpers import assert_untouched, mlp, snapshot


def _weights(attributes) -> dict:
    return {"quant_cfg": {"*weight_quantizer": attributes, "default": {"enable": False}}, "algorithm": "max"}


def _calibration(model: nn.Module) -> None:
    model(torch.randn(4, 64, generator=torch.Generator().manual_seed(0)))


BAD_CONFIGS = {
    "num_bits=(3, 3)": (_weights({"num_bits": (3, 3)}), ValueError, r"num_bits=\(3, 3\)"),
    "num_bits=9": (_weights({"num_bits": 9}), ValueError, "num_bits=9"),
    "num_bits=1": (_weights({"num_bits": 1}), ValueError, "num_bits=1"),
    "num_bits=True": (_weights({"num_bits": True}), TypeError, "num_bits=True"),
    "block size not dividing": (
        _weights({"num_bits": 4, "block_sizes": {-1: 48}}), ValueError, r"fc1\.weight_quantizer.*48.*64"),
    "block axis out of range": (_weights({"num_bits": 4, "block_sizes": {5: 16}}), ValueError, "axis 5"),
    "weight axis out of range": (_weights({"num_bits": 4, "axis": 2}), ValueError, "axis=2"),
    "unknown attribute": (_weights({"num_bitz": 8}), ValueError, "num_bitz"),
    "unknown calibrator": (_weights({"num_bits": 8, "calibrator": "median"}), ValueError, "median"),
    "axis and block_sizes": (
        _weights({"num_bits": 4, "axis": 0, "block_sizes": {-1: 16}}), ValueError, "axis=0 and block_sizes"),
    "unsigned float": (_weights({"num_bits": (4, 3), "unsigned": True}), ValueError, "unsigned"),
    "NVFP4 block 32": (
        _weights({"num_bits": (2, 1), "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": (4, 3)}}),
        ValueError, "scale_bits=\\(4, 3\\)"),
    "block type": (_weights({"num_bits": 4, "block_sizes": {-1: 16, "type": "sometimes"}}), ValueError, "sometimes"),
    "unknown algorithm": ({**_weights({"num_bits": 8}), "algorithm": "magic"}, ValueError, "magic"),
    "algorithm dict without method": (
        {**_weights({"num_bits": 8}), "algorithm": {"alpha": 0.5}}, ValueError, "method"),
    "unknown top-level key": ({**_weights({"num_bits": 8}), "quant_config": {}}, ValueError, "quant_config"),
    "quant_cfg not a dict": ({"quant_cfg": "int8"}, ValueError, "quant_cfg"),
    "list entry without quantizer_name": ({"quant_cfg": [{"cfg": {"num_bits": 8}}]}, ValueError, "quantizer_name"),
    "list entry unknown key": (
        {"quant_cfg": [{"quantizer_name": "*", "cfg": {"num_bits": 8}, "parent": "nn.Linear"}]}, ValueError,
        "parent"),
    "config not a dict": ("INT8_DEFAULT_CFG", TypeError, "config"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_raises_clearly_and_leaves_the_model_untouched(case):
    config, error, message = BAD_CONFIGS[case]
    model = mlp()
    before = snapshot(model)
    with pytest.raises(error, match=message):
        lowbit.quantize(model, config, forward_loop=_calibration)
    assert_untouched(model, before)


def test_activation_axis_out_of_range_fails_at_forward_and_rolls_back():
    model = mlp()
    before = snapshot(model)
    config = {"quant_cfg": {"*input_quantizer": {"num_bits": 8, "axis": 3}, "default": {"enable": False}}}
    with pytest.raises(ValueError, match=r"axis=3.*shape \(4, 64\)"):
        lowbit.quantize(model, config, forward_loop=_calibration)
    assert_untouched(model, before)


def test_missing_forward_loop_for_static_activations():
    model = mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match="forward_loop"):
        lowbit.quantize(model, lowbit.get_preset("INT8_DEFAULT"))
    assert_untouched(model, before)
    # weight-only and dynamic-activation configs need no data
    lowbit.quantize(mlp(), lowbit.get_preset("INT8_WEIGHT_ONLY"))
    lowbit.quantize(mlp(), lowbit.get_preset("MXFP8_DEFAULT"))


def test_forward_loop_that_raises_rolls_back():
    model = mlp()
    before = snapshot(model)

    def broken_loop(m):
        m(torch.ones(2, 64))
        raise RuntimeError("data loader died")

    with pytest.raises(RuntimeError, match="data loader died"):
        lowbit.quantize(model, lowbit.get_preset("INT8_DEFAULT"), broken_loop)
    assert_untouched(model, before)


def test_failed_requantization_restores_the_previous_quantizers():
    model = lowbit.quantize(mlp(), lowbit.get_preset("INT8_WEIGHT_ONLY"))
    before = snapshot(model)
    config = {"quant_cfg": {"*input_quantizer": {"num_bits": 8, "axis": 3}, "default": {"enable": False}}}
    with pytest.raises(ValueError, match="axis=3"):
        lowbit.quantize(model, config, forward_loop=_calibration)
    assert_untouched(model, before)
    assert model.fc1.weight_quantizer.is_enabled


def test_pattern_matching_nothing_warns_and_names_it():
    config = {"quant_cfg": {"*weight_quantizer": {"num_bits": 8}, "*fc9*": {"num_bits": 4},
                            "default": {"enable": False}}}
    with pytest.warns(UserWarning, match=r"\*fc9\*"):
        model = lowbit.quantize(mlp(), config)
    assert model.fc1.weight_quantizer.is_enabled


def test_disable_only_patterns_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lowbit.quantize(mlp(), lowbit.get_preset("INT8_WEIGHT_ONLY"))  # "*lm_head*" etc. match nothing here


def test_model_without_supported_modules():
    model = nn.Sequential(nn.ReLU(), nn.Tanh())
    with pytest.raises(ValueError, match="lowbit.register"):
        lowbit.quantize(model, lowbit.get_preset("INT8_WEIGHT_ONLY"))
    assert [type(m) for m in model] == [nn.ReLU, nn.Tanh]


def test_not_a_module():
    with pytest.raises(TypeError, match="model"):
        lowbit.quantize({"fc": nn.Linear(2, 2)}, lowbit.get_preset("INT8_WEIGHT_ONLY"))


# ---- the quantizer on its own ----------------------------------------------------------------------
def test_non_float_input_names_the_dtype():
    quantizer = TensorQuantizer(QuantizerAttributeConfig(num_bits=8))
    with pytest.raises(TypeError, match="torch.int64"):
        quantizer(torch.arange(8))


def test_axis_out_of_range_at_forward():
    quantizer = TensorQuantizer(QuantizerAttributeConfig(num_bits=8, axis=2))
    with pytest.raises(ValueError, match=r"axis=2.*\(4, 8\)"):
        quantizer(torch.ones(4, 8))


def test_axis_keeping_every_dim_is_per_element_or_rejected():
    quantizer = TensorQuantizer(QuantizerAttributeConfig(num_bits=4, axis=(0, 1)))
    x = torch.tensor([[1.0, 0.1], [0.01, 5.0]])
    try:
        out = quantizer(x)
    except ValueError as error:
        assert "axis" in str(error)
    else:
        assert torch.equal(out, x), "one amax per element represents each element exactly"


def test_block_not_dividing_at_forward():
    quantizer = TensorQuantizer(QuantizerAttributeConfig(num_bits=4, block_sizes={-1: 16}))
    with pytest.raises(ValueError, match="16 does not divide"):
        quantizer(torch.ones(4, 24))


@pytest.mark.parametrize("attributes, message", [
    ({"num_bits": 8, "fake_quant": False}, "fake_quant"),
    ({"num_bits": 8, "axis": "rows"}, "axis"),
    ({"num_bits": 8, "block_sizes": [16]}, "block_sizes"),
    ({"num_bits": 8, "block_sizes": {-1: 0}}, r"block_sizes\[-1\]=0"),
    ({"num_bits": 8, "block_sizes": {"rows": 4}}, "'rows'"),
    ({"num_bits": 8, "trt_high_precision_dtype": "Double"}, "Double"),
    ({"num_bits": 8, "asymmetric": True, "unsigned": True}, "asymmetric"),
])
def test_bad_attributes(attributes, message):
    with pytest.raises((ValueError, TypeError), match=message):
        QuantizerAttributeConfig.from_dict(attributes)


def test_a_wrong_config_type_for_the_quantizer():
    with pytest.raises(TypeError, match="config"):
        TensorQuantizer("int8")
