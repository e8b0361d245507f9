"""Module-level API: lowbit.register for a custom class, print_quant_summary, fold_weight,
disable_quantizer / enable_quantizer with patterns, conversion keeps parameters in place."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.modules import QuantModuleMixin, is_quantized

from .helpers import mlp, small_cnn, tiny_llama, token_batches
from .reference import group_reduce, int_reference, relative_error

INT8_DEFAULT = lowbit.get_preset("INT8_DEFAULT")


class ChannelScale(nn.Module):
    """y = x * weight (per last-dim channel): a module lowbit does not know."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(-2.0, 3.0, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class QuantChannelScale(QuantModuleMixin, ChannelScale):
    quantizer_names = ("input_quantizer", "weight_quantizer")

    def _setup(self) -> None:
        super()._setup()
        self.setup_calls = getattr(self, "setup_calls", 0) + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.input_quantizer(x) * self.weight_quantizer(self.weight)


class ScaledMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = ChannelScale(64)
        self.body = mlp()

    def forward(self, x):
        return self.body(self.scale(x))


@pytest.fixture
def registered_channel_scale():
    lowbit.register(ChannelScale, QuantChannelScale)
    yield
    lowbit.unregister(ChannelScale)


def test_register_custom_module(registered_channel_scale):
    model = ScaledMLP().eval()
    generator = torch.Generator().manual_seed(0)
    calibration, x = torch.randn(8, 64, generator=generator), torch.randn(8, 64, generator=generator)
    config = {"quant_cfg": {"*scale.weight_quantizer": {"num_bits": 4}, "*scale.input_quantizer": {"num_bits": 8},
                            "default": {"enable": False}}}
    weight_before = model.scale.weight
    lowbit.quantize(model, config, forward_loop=lambda m: m(calibration))
    assert type(model.scale) is QuantChannelScale and model.scale.setup_calls == 1
    assert model.scale.weight is weight_before, "conversion swaps the class, the parameter stays"
    names = [name for name, _ in lowbit.iter_quantizers(model)]
    assert "scale.weight_quantizer" in names and "scale.input_quantizer" in names
    assert model.scale.input_quantizer.amax.item() == calibration.abs().max().item()

    weight = weight_before.detach()
    expected_weight = int_reference(weight, weight.abs().max().double(), 4).values
    expected_input = int_reference(x, calibration.abs().max().double(), 8).values
    with torch.no_grad():
        actual = model.scale(x)
    assert relative_error(actual, expected_input * expected_weight) < 1e-6


def test_unregistered_custom_module_is_left_alone():
    model = ScaledMLP().eval()
    lowbit.quantize(model, INT8_DEFAULT, forward_loop=lambda m: m(torch.ones(2, 64)))
    assert type(model.scale) is ChannelScale


def test_register_rejects_a_class_that_does_not_subclass_the_original():
    with pytest.raises(TypeError, match="must subclass"):
        lowbit.register(ChannelScale, QuantModuleMixin)
    with pytest.raises(TypeError, match="original_cls"):
        lowbit.register("ChannelScale", QuantChannelScale)


def test_print_quant_summary(capsys):
    model = mlp()
    lowbit.quantize(model, INT8_DEFAULT, forward_loop=lambda m: m(torch.ones(2, 64)))
    lowbit.print_quant_summary(model)
    lines = capsys.readouterr().out.splitlines()
    by_name = {line.split()[0]: line for line in lines[:-1]}
    assert set(by_name) == {f"fc{i}.{slot}" for i in (1, 2) for slot in
                            ("input_quantizer", "weight_quantizer", "output_quantizer")}
    assert "int8 per-channel axis=0" in by_name["fc1.weight_quantizer"]
    assert "amax" in by_name["fc1.weight_quantizer"]
    assert "int8 per-tensor amax=1" in by_name["fc1.input_quantizer"]
    assert "disabled" in by_name["fc1.output_quantizer"]
    assert lines[-1] == "4 of 6 quantizers enabled"


def test_fold_weight_keeps_outputs_and_disables_weight_quantizers():
    model = lowbit.quantize(tiny_llama(), lowbit.get_preset("INT4_BLOCKWISE_WEIGHT_ONLY"))
    tokens = token_batches(512, count=1)[0]
    with torch.no_grad():
        before = model(tokens).logits
        expected_weight = model.model.layers[0].mlp.up_proj.quantized_weight().clone()
    lowbit.fold_weight(model)
    weight_quantizers = [q for n, q in lowbit.iter_quantizers(model) if n.endswith("weight_quantizer")]
    assert weight_quantizers and not any(q.is_enabled for q in weight_quantizers)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, expected_weight)
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, before)


def test_fold_weight_on_conv_keeps_outputs():
    model = small_cnn()
    x = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(1))
    lowbit.quantize(model, INT8_DEFAULT, forward_loop=lambda m: m(x))
    with torch.no_grad():
        before = model(x)
        lowbit.fold_weight(model)
        assert torch.equal(model(x), before)
    conv_weight = small_cnn().conv2d.weight.detach()
    expected = int_reference(conv_weight, group_reduce(conv_weight, "absmax", 0), 8).values
    assert relative_error(model.conv2d.weight, expected) < 1e-6


def test_disable_and_enable_quantizer_by_pattern():
    model = mlp()
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    lowbit.quantize(model, INT8_DEFAULT, forward_loop=lambda m: m(x))
    quantizers = dict(lowbit.iter_quantizers(model))
    with torch.no_grad():
        quantized = model(x)
    assert lowbit.disable_quantizer(model, "*input_quantizer") == 2
    assert not quantizers["fc1.input_quantizer"].is_enabled and quantizers["fc1.weight_quantizer"].is_enabled
    assert lowbit.disable_quantizer(model, lambda name: name.startswith("fc2.weight")) == 1
    assert not quantizers["fc2.weight_quantizer"].is_enabled
    assert lowbit.disable_quantizer(model, "*") == 6
    with torch.no_grad():
        assert torch.equal(model(x), mlp()(x)), "everything off: the float model"
    assert lowbit.enable_quantizer(model, "*[wi][en]*_quantizer") == 4  # weight_ and input_, not output_
    assert not quantizers["fc1.output_quantizer"].is_enabled
    with torch.no_grad():
        assert torch.equal(model(x), quantized), "re-enabled quantizers kept their amax"
    assert lowbit.disable_quantizer(model, "*no_such_quantizer*") == 0


def test_quantize_twice_reconfigures_without_nesting():
    model = mlp(width=128)
    lowbit.quantize(model, lowbit.get_preset("INT8_WEIGHT_ONLY"))
    lowbit.quantize(model, lowbit.get_preset("INT4_BLOCKWISE_WEIGHT_ONLY"))
    assert is_quantized(model.fc1) and type(model.fc1).__mro__.count(nn.Linear) == 1
    quantizer = model.fc1.weight_quantizer
    assert quantizer.config.num_bits == 4 and quantizer.config.block_sizes == {-1: 128}
    assert quantizer.amax.shape == (256, 1, 1), "recalibrated for the new blocks"
