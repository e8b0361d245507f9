"""ONNX Q/DQ export, without onnx: the export copy (custom ops in eager mode, ONNX's Q/DQ math) computes what
the fake-quantized model computes (numerics="lowbit": bit for bit; "onnx", scales as steps: within float32
rounding), and formats ONNX cannot express are refused naming the layer.
(The ONNX file run by onnxruntime: tests/consumers/test_onnx_consumer.py.)"""

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.export.onnx_qdq import export_copy


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 96), nn.Linear(96, 32)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 32, 3, stride=2)
        self.head = nn.Linear(32 * 7 * 7, 10)

    def forward(self, x):
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))).flatten(1))


def sample(shape, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2
    x.view(-1)[5] = 15.0  # an outlier
    return x


def weight_only(bits, **extra):
    return {"quant_cfg": {"*weight_quantizer": {"num_bits": bits, **extra}, "*input_quantizer": {"enable": False},
                          "default": {"enable": False}}, "algorithm": "max"}


CONFIGS = {
    "int8_w8a8": lowbit.INT8_DEFAULT_CFG,
    "int8_pre_quant_scale": lowbit.INT8_DEFAULT_CFG,
    "fp8": lowbit.FP8_DEFAULT_CFG,
    "int4_blocks": weight_only(4, block_sizes={-1: 32}),
    "int4_asym_blocks": weight_only(4, asymmetric=True, block_sizes={-1: 16}),
}


def quantized(model_cls, cfg_name, x):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = model_cls().eval()
    model = lowbit.quantize(model, copy.deepcopy(CONFIGS[cfg_name]), lambda m: m(x))
    if cfg_name == "int8_pre_quant_scale":  # SmoothQuant's state: x / s into the input, w * s into the weight
        layer = model.fc1
        smooth = torch.rand(layer.in_features, generator=torch.Generator().manual_seed(4)) + 0.5
        layer.input_quantizer.pre_quant_scale = 1 / smooth
        layer.weight_quantizer.pre_quant_scale = smooth
        layer.weight_quantizer.set_amax(layer.weight_quantizer.compute_amax(layer.weight.detach()))
    return model


CASES = [(MLP, (8, 64), name) for name in CONFIGS] + [(CNN, (2, 3, 16, 16), name) for name in ("int8_w8a8", "fp8")]


@pytest.mark.parametrize("numerics", ["lowbit", "onnx"])
@pytest.mark.parametrize("model_cls,shape,cfg_name", CASES)
def test_export_copy_computes_the_fake_quantized_model(model_cls, shape, cfg_name, numerics):
    x = sample(shape, 1)
    model = quantized(model_cls, cfg_name, x)
    exported, int4 = export_copy(model, numerics)
    with torch.no_grad():
        reference, result = model(x), exported(x)
    if numerics == "lowbit":  # the same float32 operations as lowbit's fake quantization
        assert torch.equal(result, reference)
    else:  # codes * step for lowbit's codes / scale: measured <= 2.6e-7
        assert (result.double() - reference.double()).norm() <= 1e-5 * reference.double().norm()
    assert bool(int4) == cfg_name.startswith("int4")
    assert any(isinstance(m, nn.Linear) and hasattr(m, "weight_quantizer") for m in model.modules())  # untouched


@pytest.mark.parametrize("cfg,message", [
    (lowbit.FP8_PER_CHANNEL_PER_TOKEN_CFG, r"input quantizer e4m3 block\[-1:None\] dynamic"),
    (lowbit.NVFP4_DEFAULT_CFG, "nvfp4"),
    (lowbit.MXFP8_DEFAULT_CFG, "mx"),
])
def test_formats_onnx_cannot_express_are_refused(cfg, message):
    x = sample((8, 64), 2)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = lowbit.quantize(MLP().eval(), copy.deepcopy(cfg), lambda m: m(x))
    with pytest.raises(ValueError, match=rf"layer 'fc1'.*{message}"):
        export_copy(model)


def test_unknown_numerics_is_refused():
    x = sample((8, 64), 2)
    model = quantized(MLP, "int8_w8a8", x)
    with pytest.raises(ValueError, match=r"numerics='exact'; allowed: 'lowbit', 'onnx'"):
        export_copy(model, "exact")


def test_narrow_range_input_is_refused():
    """ONNX's int8 QuantizeLinear saturates at -128; a narrow-range input quantizer (-127) is not written."""
    x = sample((8, 64), 2)
    cfg = copy.deepcopy(lowbit.INT8_DEFAULT_CFG)
    cfg["quant_cfg"]["*input_quantizer"] = {**cfg["quant_cfg"]["*input_quantizer"], "narrow_range": True}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = lowbit.quantize(MLP().eval(), cfg, lambda m: m(x))
    with pytest.raises(ValueError, match=r"layer 'fc1': input quantizer int8 per-tensor narrow_range"):
        export_copy(model)


@pytest.mark.parametrize("cfg_name", ["int8_w8a8", "fp8"])
def test_lowbit_numerics_are_exact_for_bfloat16_models(cfg_name):
    """lowbit quantizes a bfloat16 input in float32 (x / step, round, / scale) and casts back; so does the graph."""
    x = sample((8, 64), 1)
    model = quantized(MLP, cfg_name, x).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(export_copy(model, "lowbit")[0](x.bfloat16()), model(x.bfloat16()))
