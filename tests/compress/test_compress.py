"""compress(): outputs equal the fake-quant model's, real sizes, training through the packed base, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.compress import linear as linear_module
from lowbit.compress.convert import compress, compressed_weight_bytes
from lowbit.compress.linear import CompressedLinear
from lowbit.compress.packed import WeightFormat, quantize_weight, storage_spec
from lowbit.eval.size import model_size
from lowbit.kernels import cpu_fp

WEIGHT_ONLY = ["W4A16_NVFP4_CFG", "MXFP4_DEFAULT_CFG", "NVFP4_DEFAULT_CFG", "FP8_DEFAULT_CFG",
               "FP8_PER_CHANNEL_PER_TOKEN_CFG", "MXFP8_DEFAULT_CFG"]
CPU_KERNEL = {"INT4_BLOCKWISE_WEIGHT_ONLY_CFG": "_cpu_int4", "INT8_WEIGHT_ONLY_CFG": "_cpu_int8"}


def _model(seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(256, 384), nn.GELU(), nn.Linear(384, 128, bias=False))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model.to(torch.bfloat16)


def _quantized(preset: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed + 100)
    batches = [torch.randn(4, 256, generator=generator).to(torch.bfloat16) for _ in range(2)]
    model = lowbit.quantize(_model(seed), copy.deepcopy(getattr(lowbit, preset)), lambda m: [m(b) for b in batches])
    return model, torch.randn(2, 3, 256, generator=generator).to(torch.bfloat16)


@pytest.mark.parametrize("preset", WEIGHT_ONLY)
def test_outputs_equal_fake_quant_bitwise(preset, monkeypatch):
    """CPU without lowbit's C kernels (no compiler: ``kernels.cpu_fp``; with them see test_cpu_fp_layers.py):
    formats without a torch CPU kernel run dequantize + F.linear: bit-exact."""
    monkeypatch.setattr(cpu_fp, "available", lambda: False)
    model, x = _quantized(preset)
    with torch.no_grad():
        expected = model(x)
        weights = [m.weight_quantizer(m.weight) for m in model.modules() if hasattr(m, "weight_quantizer")]
    compressed = compress(model)
    layers = [m for m in compressed.modules() if isinstance(m, CompressedLinear)]
    assert len(layers) == 2
    for layer, weight in zip(layers, weights, strict=True):
        assert torch.equal(layer.dequantized_weight(torch.bfloat16), weight)
    with torch.no_grad():
        assert torch.equal(compressed(x), expected)


@pytest.mark.parametrize("preset", sorted(CPU_KERNEL))
def test_int4_int8_weight_only_run_torch_cpu_kernels_close_to_float64(preset):
    """CPU INT4 / INT8 weight-only: compress() prepares torch's kernel once; outputs within bf16 rounding of the
    float64 product of the fake-quant weights (relative Frobenius 6e-3, about twice what bf16's roundings of the
    scales and of the outputs give here), no further from it than 1.5x the fake-quant model itself."""
    model, x = _quantized(preset)
    with torch.no_grad():
        expected = model(x)
        weights = [m.weight_quantizer(m.weight) for m in model.modules() if hasattr(m, "weight_quantizer")]
        reference = x.double()
        reference = torch.nn.functional.gelu(reference @ weights[0].double().T + model[0].bias.double())
        reference = reference.to(torch.bfloat16).double() @ weights[1].double().T
    compressed = compress(model)
    layers = [m for m in compressed.modules() if isinstance(m, CompressedLinear)]
    assert [layer._prepared.function.__name__ for layer in layers] == [CPU_KERNEL[preset]] * 2
    with torch.no_grad():
        out = compressed(x).double()

    def error(tensor):
        return ((tensor.double() - reference).norm() / reference.norm()).item()

    assert error(out) <= 6e-3
    assert error(out) <= 1.5 * error(expected)


def test_int8_w8a8_uses_integer_matmul_and_matches_float64():
    model, x = _quantized("INT8_DEFAULT_CFG")
    first = model[0]
    with torch.no_grad():
        x_hat = first.input_quantizer(x).double()
        reference = x_hat @ first.weight_quantizer(first.weight).double().T + first.bias.double()
    compressed = compress(model)
    with torch.no_grad():
        out = compressed[0](x)
    floor = ((reference.to(torch.bfloat16).double() - reference).norm() / reference.norm()).item()
    assert ((out.double() - reference).norm() / reference.norm()).item() <= 2 * floor


def _reference_fp8_linear(calls: list):
    """Stands in for lowbit.kernels.fp8_linear (CUDA only): E4M3 activation codes by the formula, float64 product."""

    def fp8_linear(x, weight, bias, activation_amax, out_dtype, fast_accumulation=False):
        calls.append(activation_amax)
        x64 = x.double()
        amax = x64.abs().amax(dim=-1, keepdim=True) if activation_amax is None else activation_amax.double()
        amax32 = amax.float()  # step = amax / 448 and scale = 448 / amax, correctly rounded float32
        tiny = amax32 <= 2**-24
        step = torch.where(tiny, 1.0, amax32 / 448.0).double()
        scale = torch.where(tiny, 1.0, torch.full_like(amax32, 448.0) / amax32).double()
        # codes = e4m3(fl32(x / step)): the float64 quotient of float32 operands rounds to float32 correctly
        codes = (x64.float().double() / step).float().clamp(-448, 448).to(torch.float8_e4m3fn).double()
        w64 = weight.codes.double() * weight.inverse_scale_row.double().reshape(-1, 1)
        out = (codes / scale) @ w64.T
        return (out if bias is None else out + bias.double()).to(out_dtype)

    return fp8_linear


@pytest.mark.parametrize("preset, static", [("FP8_DEFAULT_CFG", True), ("FP8_PER_CHANNEL_PER_TOKEN_CFG", False)])
def test_fp8_w8a8_calls_fused_fp8_linear_with_the_fake_quant_amax(monkeypatch, preset, static):
    """Where the FP8 kernel runs (CUDA >= sm89) CompressedLinear hands x, the weight codes and the activation
    amax (calibrated, or None for per-token dynamic) to fp8_linear; simulated here with a float64 stand-in."""
    model, x = _quantized(preset)
    first = model[0]
    with torch.no_grad():  # float32 fake quant: x_hat and w_hat without bf16 rounding
        x_hat = first.input_quantizer(x.float()).double()
        expected = x_hat @ first.weight_quantizer(first.weight.float()).double().T + first.bias.double()
    calls = []
    monkeypatch.setattr(linear_module, "_w8a8_kind", lambda quantizer, fmt, x, **kwargs: "fp8")
    monkeypatch.setattr(cpu_fp, "available", lambda: False)  # else the CPU prepares lowbit's own C kernel
    monkeypatch.setattr(linear_module, "fp8_linear", _reference_fp8_linear(calls))
    compressed = compress(model)
    with torch.no_grad():
        out = compressed[0](x).double()
    assert len(calls) == 1
    if static:
        assert torch.equal(calls[0].reshape(()), first.input_quantizer.amax.float().reshape(()))
    else:
        assert calls[0] is None
    floor = ((expected.to(torch.bfloat16).double() - expected).norm() / expected.norm()).item()
    assert ((out - expected).norm() / expected.norm()).item() <= 2 * floor


@pytest.mark.parametrize("preset, max_ratio", [("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", 0.30), ("W4A16_NVFP4_CFG", 0.29),
                                               ("FP8_DEFAULT_CFG", 0.51)])
def test_weight_bytes_and_model_size(preset, max_ratio):
    model, _ = _quantized(preset)
    compressed = compress(model)
    packed, dense = compressed_weight_bytes(compressed)
    assert dense == (256 * 384 + 384 * 128) * 2
    assert packed <= max_ratio * dense
    others = sum(t.numel() * t.element_size() for name, t in compressed.state_dict().items()
                 if not name.rsplit(".", 1)[-1].startswith("weight_"))  # biases, input-quantizer amax
    assert model_size(compressed) == packed + others


def test_storage_spec_matches_quantize_weight():
    weight = torch.randn(32, 128, generator=torch.Generator().manual_seed(5))
    for fmt in [WeightFormat("int", 4, 32), WeightFormat("int", 8, per_channel=True), WeightFormat("int_asym", 6, 64),
                WeightFormat("float", (4, 3)), WeightFormat("float", (2, 1), per_channel=True),
                WeightFormat("nvfp4", (2, 1), 16), WeightFormat("mx", (5, 2), 32),
                WeightFormat("int", 4, 32, unsigned=True)]:
        packed = quantize_weight(weight, fmt)
        assert {k: (tuple(v.shape), v.dtype) for k, v in packed.tensors().items()} == storage_spec(fmt, (32, 128))


def test_gradients_match_fake_quant_model():
    model, x = _quantized("INT4_BLOCKWISE_WEIGHT_ONLY_CFG")
    reference_model = copy.deepcopy(model)
    for parameter in reference_model.parameters():
        parameter.requires_grad_(parameter.dim() == 1)  # weights frozen, biases trained, as compressed
    compressed = compress(model)
    x_reference = x.clone().requires_grad_()
    x_compressed = x.clone().requires_grad_()
    reference_model(x_reference).float().square().sum().backward()
    compressed(x_compressed).float().square().sum().backward()
    assert torch.allclose(x_compressed.grad, x_reference.grad, rtol=1e-2, atol=1e-3)
    assert torch.allclose(compressed[0].bias.grad, reference_model[0].bias.grad, rtol=1e-2, atol=1e-3)
    assert not any(b.requires_grad for b in compressed.buffers())


def test_lora_adapters_train_on_a_frozen_packed_base(monkeypatch):
    monkeypatch.setattr(cpu_fp, "available", lambda: False)  # the same dequantize path with and without adapters
    model, x = _quantized("W4A16_NVFP4_CFG")
    compressed = compress(model)
    with torch.no_grad():
        before = compressed(x)
    generator = torch.Generator().manual_seed(7)
    for layer in compressed.modules():
        if isinstance(layer, CompressedLinear):
            layer.add_lora(rank=4, alpha=8, generator=generator)
    with torch.no_grad():
        assert torch.equal(compressed(x), before)  # B starts at zero
    codes = [layer.weight_codes.clone() for layer in compressed.modules() if isinstance(layer, CompressedLinear)]
    trainable = [p for name, p in compressed.named_parameters() if "lora" in name]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    target = torch.randn(before.shape, generator=generator).to(torch.bfloat16)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = (compressed(x).float() - target.float()).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = [layer.weight_codes for layer in compressed.modules() if isinstance(layer, CompressedLinear)]
    assert all(torch.equal(a, b) for a, b in zip(codes, after, strict=True))


def test_compress_errors_leave_the_model_untouched():
    with pytest.raises(ValueError, match="call lowbit.quantize"):
        compress(_model())
    model, _ = _quantized("INT4_BLOCKWISE_WEIGHT_ONLY_CFG")
    model[2].weight_quantizer.set_config({"num_bits": 4, "axis": 1})
    with pytest.raises(ValueError, match=r"2\.weight_quantizer: axis=1"):
        compress(model)
    assert not any(isinstance(m, CompressedLinear) for m in model.modules())
    with pytest.raises(ValueError, match="scale_dtype"):
        compress(model, scale_dtype=torch.int8)
    with pytest.raises(TypeError, match="model"):
        compress("model")
    with pytest.raises(ValueError, match="rank"):
        CompressedLinear(8, 8, WeightFormat("int", 4, 8)).add_lora(0)


def test_compress_a_single_quantized_linear_returns_the_new_module(monkeypatch):
    monkeypatch.setattr(cpu_fp, "available", lambda: False)  # bit-exact dequantize path
    layer = lowbit.quantize(_model()[0], copy.deepcopy(lowbit.W4A16_NVFP4_CFG))
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    with torch.no_grad():
        expected = layer(x)
    compressed = compress(layer)
    assert isinstance(compressed, CompressedLinear)
    with torch.no_grad():
        assert torch.equal(compressed(x), expected)


@pytest.mark.parametrize("preset, max_ratio", [("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", 0.30), ("W4A16_NVFP4_CFG", 0.29),
                                               ("FP8_PER_CHANNEL_PER_TOKEN_CFG", 0.51)])
def test_default_model_weight_bytes(preset, max_ratio):
    from lowbit.assets import load_default_model

    model, _ = load_default_model(dtype=torch.bfloat16)
    compressed = compress(lowbit.quantize(model, copy.deepcopy(getattr(lowbit, preset))))
    packed, dense = compressed_weight_bytes(compressed)
    assert sum(isinstance(m, CompressedLinear) for m in compressed.modules()) == 8 * 7  # lm_head stays bf16
    assert packed <= max_ratio * dense
