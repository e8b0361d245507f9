"""CompressedLinear's thin forward: the kernel prepared once, the state dict unchanged, re-decided when needed."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import lowbit
from lowbit.compress import compress, load_compressed, save_compressed
from lowbit.compress.linear import CompressedLinear
from lowbit.compress.packed import storage_spec


def _model() -> nn.Module:
    generator = torch.Generator().manual_seed(4)
    model = nn.Sequential(nn.Linear(256, 384), nn.GELU(), nn.Linear(384, 128, bias=False))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model.to(torch.bfloat16)


def _compressed() -> tuple[nn.Module, torch.Tensor]:
    x = torch.randn(2, 5, 256, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    model = lowbit.quantize(_model(), copy.deepcopy(lowbit.INT4_BLOCKWISE_WEIGHT_ONLY_CFG))
    return compress(model), x


def test_state_dict_holds_the_canonical_packed_tensors_only(tmp_path):
    """The CPU kernel's codes are derived (not buffers); a loaded model prepares on its first call and gives the
    same outputs."""
    model, x = _compressed()
    layer = model[0]
    assert layer._prepared.function.__name__ == "_cpu_int4"
    expected = {f"weight_{name}" for name in storage_spec(layer.weight_format, (384, 256))} | {"bias"}
    assert set(layer.state_dict()) == expected
    save_compressed(model, tmp_path)
    restored = load_compressed(_model, tmp_path)
    assert restored[0]._prepared is None
    with torch.no_grad():
        assert torch.equal(restored(x), model(x))
    assert restored[0]._prepared.function.__name__ == "_cpu_int4"


def test_lora_and_quantizer_changes_leave_the_prepared_kernel():
    model, x = _compressed()
    layer: CompressedLinear = model[0]
    with torch.no_grad():
        plain = layer(x)
    layer.add_lora(4)
    assert layer._prepared is None
    with torch.no_grad():  # B = 0: the LoRA path gives the dequantized product (bf16, exact weights)
        torch.testing.assert_close(layer(x), plain, rtol=2e-2, atol=2e-2)
    layer.lora_a = layer.lora_b = None
    layer.output_quantizer = lowbit.TensorQuantizer(lowbit.QuantizerAttributeConfig(num_bits=8))
    layer.prepare(torch.bfloat16)
    assert layer._prepared is None


def test_inputs_needing_gradients_take_the_autograd_path():
    """Backward through the packed weight (``_PackedLinearFunction``): d sum(out) / dx = 1 @ W, exactly the
    dequantized bf16 weights' column sums, rounded once to bf16 (float64 reference, tolerance 2**-8 relative)."""
    model, x = _compressed()
    x = x.requires_grad_()
    layer = model[0]
    out = layer(x)
    assert layer._prepared is not None and out.grad_fn is not None
    out.sum().backward()
    expected = layer.dequantized_weight(torch.bfloat16).double().sum(0).expand_as(x)
    torch.testing.assert_close(x.grad.double(), expected, rtol=2**-8, atol=1e-6)


def test_a_bias_needing_gradients_takes_the_autograd_path():
    """A trained bias with a frozen input (adapters on a compressed model) must not go through the prepared kernel,
    which may add the bias inside a custom kernel (CUDA Triton, FP8 ``_scaled_mm``) where autograd cannot follow:
    the prepared call is replaced by one that fails, and d sum(out) / d bias = the row count per output."""
    model, x = _compressed()
    layer = model[0]
    layer(x)

    def refuse(*arguments, **options):
        raise AssertionError("the prepared kernel ran for a bias that needs gradients")

    layer._prepared = dataclasses.replace(layer._prepared, function=refuse)
    layer.bias.requires_grad_(True)
    layer(x).sum().backward()
    assert torch.equal(layer.bias.grad, torch.full_like(layer.bias, x.shape[0] * x.shape[1]))
    layer.bias.requires_grad_(False)
    with pytest.raises(AssertionError, match="prepared kernel ran"):
        layer(x)


def test_a_disabled_input_quantizer_with_a_pre_quant_scale_still_scales_the_input():
    """AWQ leaves ``1/s`` as the disabled input quantizer's pre_quant_scale where no norm takes it (weight-only
    compress_weights): the compressed layer must compute ``(x * pre_quant_scale) @ W_hat^T + b``, float64
    reference from the dequantized weight, tolerance 1e-4 relative (float32 matmul)."""
    generator = torch.Generator().manual_seed(6)
    model = lowbit.quantize(_model().float(), copy.deepcopy(lowbit.INT4_BLOCKWISE_WEIGHT_ONLY_CFG))
    scale = torch.rand(384, generator=generator) * 4 + 0.25
    scale[::37] = 30.0  # outlier channels, as AWQ's scales have
    model[2].input_quantizer.pre_quant_scale = scale
    x = torch.randn(3, 384, generator=generator)
    layer = compress(model)[2]
    expected = (x.double() * scale.double()) @ layer.dequantized_weight(torch.float32).double().T
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model[2](x).double(), expected, rtol=1e-4, atol=1e-5)
