"""save_compressed / load_compressed round trips: identical outputs, packed dtypes kept, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.compress.convert import compress
from lowbit.compress.linear import CompressedLinear
from lowbit.compress.serialization import STATE_FILE, load_compressed, save_compressed


def _model() -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 64), nn.Conv2d(4, 4, (1, 128)))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def _batches():
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(3, 128, generator=generator) for _ in range(2)]


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model[2](model[1](model[0](x)))


@pytest.mark.parametrize("preset", ["INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "NVFP4_DEFAULT_CFG", "INT8_DEFAULT_CFG",
                                    "MXFP4_DEFAULT_CFG", "FP8_DEFAULT_CFG"])
def test_round_trip_is_exact(tmp_path, preset):
    config = copy.deepcopy(getattr(lowbit, preset))
    model = lowbit.quantize(_model(), config, lambda m: [_run(m, b) for b in _batches()])
    compressed = compress(model)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = _run(compressed, x)
    save_compressed(compressed, tmp_path)
    restored = load_compressed(_model, tmp_path)
    assert isinstance(restored[0], CompressedLinear)
    assert restored[0].weight_codes.dtype == compressed[0].weight_codes.dtype
    assert type(restored[3]) is type(compressed[3])  # the conv stays fake-quantized
    with torch.no_grad():
        assert torch.equal(_run(restored, x), expected)
        conv_input = torch.randn(1, 4, 2, 160, generator=torch.Generator().manual_seed(3))
        assert torch.equal(restored[3](conv_input), compressed[3](conv_input))


def test_round_trip_keeps_lora_adapters(tmp_path):
    model = compress(lowbit.quantize(_model(), copy.deepcopy(lowbit.INT4_BLOCKWISE_WEIGHT_ONLY_CFG)))
    model[0].add_lora(rank=2, alpha=4, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        model[0].lora_b.normal_(generator=torch.Generator().manual_seed(5))
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = model[0](x)
    save_compressed(model, tmp_path)
    restored = load_compressed(_model(), tmp_path)
    with torch.no_grad():
        assert torch.equal(restored[0](x), expected)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="compress"):
        save_compressed(_model(), tmp_path)
    with pytest.raises(FileNotFoundError, match=STATE_FILE):
        load_compressed(_model, tmp_path / "absent")
    model = compress(lowbit.quantize(_model(), copy.deepcopy(lowbit.INT4_BLOCKWISE_WEIGHT_ONLY_CFG)))
    save_compressed(model, tmp_path)
    with pytest.raises(ValueError, match="different architecture"):
        load_compressed(nn.Sequential(nn.Linear(128, 256)), tmp_path)
