"""Straight-through gradients of TensorQuantizer and a QAT step.

- clip-aware STE: d sum(q(x)) / dx is exactly 1 inside the representable range ([-amax, amax] signed,
  [0, amax] unsigned, [amin, amax] asymmetric) and exactly 0 outside;
- learn_amax (PACT): d sum(q(x)) / d amax = #(x > amax) - #(x < -amax) per amax group, exactly;
- NVFP4 / MX: plain STE, gradient 1 everywhere;
- QAT: a few SGD steps through a fake-quantized MLP (INT4 weights, learnable amax) lower the loss.
"""

from __future__ import annotations

import torch
from torch import nn

import lowbit
from lowbit import QuantizerAttributeConfig, TensorQuantizer

from .helpers import calibrate_quantizer, mlp
from .reference import random_with_outliers


def _data(seed: int, shape=(16, 64)) -> torch.Tensor:
    return random_with_outliers(shape, torch.Generator().manual_seed(seed))


def _grad_of_sum(quantizer: TensorQuantizer, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    quantizer(x).sum().backward()
    return x.grad


def test_ste_per_tensor_is_one_inside_zero_outside():
    x = _data(0)
    quantizer = TensorQuantizer(QuantizerAttributeConfig(num_bits=8))
    quantizer.amax = torch.tensor(2.5)
    inside = x.abs() <= 2.5
    assert inside.any() and (~inside).any()
    assert torch.equal(_grad_of_sum(quantizer, x), inside.float())


def test_ste_per_channel_uses_each_channels_amax():
    x = _data(1)
    quantizer = TensorQuantizer(QuantizerAttributeConfig(num_bits=4, axis=0))
    amax = torch.linspace(0.5, 3.0, 16)[:, None]
    quantizer.amax = amax
    assert torch.equal(_grad_of_sum(quantizer, x), (x.abs() <= amax).float())


def test_ste_block_uses_each_blocks_amax():
    x = _data(2)
    quantizer = TensorQuantizer(QuantizerAttributeConfig(num_bits=4, block_sizes={-1: 16}))
    calibrate_quantizer(quantizer, _data(3))
    block_amax = quantizer.amax.reshape(16, 4, 1).expand(16, 4, 16).reshape(16, 64)
    assert torch.equal(_grad_of_sum(quantizer, x), (x.abs() <= block_amax).float())


def test_ste_unsigned_and_asymmetric_ranges():
    x = _data(4)
    unsigned = TensorQuantizer(QuantizerAttributeConfig(num_bits=8, unsigned=True))
    unsigned.amax = torch.tensor(2.0)
    assert torch.equal(_grad_of_sum(unsigned, x), ((x >= 0) & (x <= 2.0)).float())

    asymmetric = TensorQuantizer(QuantizerAttributeConfig(num_bits=8, asymmetric=True))
    asymmetric.amin, asymmetric.amax = torch.tensor(-1.0), torch.tensor(3.0)
    assert torch.equal(_grad_of_sum(asymmetric, x), ((x >= -1.0) & (x <= 3.0)).float())


def test_ste_is_one_at_the_range_boundary():
    quantizer = TensorQuantizer(QuantizerAttributeConfig(num_bits=8))
    quantizer.amax = torch.tensor(2.0)
    x = torch.tensor([-3.0, -2.0, 0.5, 2.0, 3.0])
    assert _grad_of_sum(quantizer, x).tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_ste_dynamic_amax_passes_everything():
    """Dynamic amax = max|x| per group, so every group's largest element sits on the boundary."""
    x = _data(5)
    quantizer = TensorQuantizer(QuantizerAttributeConfig(num_bits=4, axis=0))
    assert torch.equal(_grad_of_sum(quantizer, x), torch.ones_like(x))


def test_ste_nvfp4_and_mx_pass_everything():
    x = _data(6)
    for block_sizes in ({-1: 16, "type": "dynamic", "scale_bits": (4, 3)},
                        {-1: 32, "type": "dynamic", "scale_bits": (8, 0)}):
        quantizer = TensorQuantizer(QuantizerAttributeConfig(num_bits=(2, 1), block_sizes=block_sizes))
        assert torch.equal(_grad_of_sum(quantizer, x), torch.ones_like(x))


def test_learn_amax_gets_the_pact_gradient():
    x = _data(7)
    quantizer = TensorQuantizer(QuantizerAttributeConfig(num_bits=8, axis=0, learn_amax=True))
    calibrate_quantizer(quantizer, _data(8) * 0.3)  # smaller than x: many elements clip
    assert isinstance(quantizer.amax, nn.Parameter)
    assert [name for name, _ in quantizer.named_parameters()] == ["amax"]
    amax = quantizer.amax.detach()
    grad = _grad_of_sum(quantizer, x)
    expected = ((x > amax).sum(dim=1) - (x < -amax).sum(dim=1)).float()
    assert torch.equal(quantizer.amax.grad.reshape(-1), expected)
    assert torch.equal(grad, (x.abs() <= amax).float())


def test_qat_steps_reduce_the_loss():
    model = mlp(width=32)
    generator = torch.Generator().manual_seed(9)
    inputs = torch.randn(64, 32, generator=generator)
    targets = torch.randn(64, 32, generator=generator)
    config = {
        "quant_cfg": {
            "*weight_quantizer": {"num_bits": 4, "block_sizes": {-1: 16}, "learn_amax": True},
            "*input_quantizer": {"num_bits": 8},
            "default": {"enable": False},
        },
        "algorithm": "max",
    }
    lowbit.quantize(model, config, forward_loop=lambda m: m(inputs))
    model.train()
    amax_parameters = [p for n, p in model.named_parameters() if n.endswith("amax")]
    assert len(amax_parameters) == 2
    amax_before = [p.detach().clone() for p in amax_parameters]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = nn.functional.mse_loss(model(inputs), targets).item()
    assert final < 0.9 * losses[0], losses
    assert all(torch.isfinite(torch.tensor(losses)))
    moved = [not torch.equal(a, p.detach()) for a, p in zip(amax_before, amax_parameters, strict=True)]
    assert any(moved), "the learnable amax got updated"
