"""A format, an algorithm and an export target added from outside lowbit (here), each run end to end.

Each is registered through lowbit's public hooks (``lowbit.register_codebook``, ``lowbit.register_algorithm``,
``lowbit.register_exporter``), with nothing in ``lowbit/`` edited, and checked against references written here
in float64.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lowbit
from lowbit.export import export_formats
from lowbit.files import atomic_directory
from tests.algorithms.tiny_llama import forward_loop_for, tiny_llama

# A five-level codebook: nearest of {-1, -1/2, 0, 1/2, 1} times the group's max |w|.
TOY_LEVELS = (-1.0, -0.5, 0.0, 0.5, 1.0)
lowbit.register_codebook("test_five_levels", TOY_LEVELS)


def _weights_with_outliers(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    weight = torch.randn(shape, generator=generator) * 0.1
    return torch.where(torch.rand(shape, generator=generator) < 0.02, weight * 20, weight)


def _five_level_reference(weight: torch.Tensor, group: int) -> torch.Tensor:
    """float64: each group of ``group`` inputs scaled by its max |w|, rounded to the nearest level."""
    w = weight.double().unflatten(1, (-1, group))
    amax = w.abs().amax(dim=-1, keepdim=True)
    levels = torch.tensor(TOY_LEVELS, dtype=torch.float64)
    nearest = (w.unsqueeze(-1) / amax.unsqueeze(-1) - levels).abs().argmin(dim=-1)
    return (levels[nearest] * amax).flatten(1)


def test_a_codebook_format_registered_outside_quantizes_and_runs():
    generator = torch.Generator().manual_seed(7)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.copy_(_weights_with_outliers(tuple(layer.weight.shape), generator))
    float_model = copy.deepcopy(model)
    config = {"quant_cfg": {"*weight_quantizer": {"num_bits": 3, "block_sizes": {-1: 16},
                                                  "codebook": "test_five_levels"}}, "algorithm": "max"}
    lowbit.quantize(model, config)
    x = torch.randn(5, 32, generator=generator) * 2
    w1, w2 = (_five_level_reference(layer.weight, 16) for layer in (float_model[0], float_model[2]))
    hidden = torch.relu(x.double() @ w1.T + float_model[0].bias.double())
    expected = hidden @ w2.T + float_model[2].bias.double()
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), expected, rtol=1e-5, atol=1e-5)
    assert "test_five_levels" in lowbit.quant_summary(model)
    with pytest.raises(ValueError, match="codebook='no_such_book' is not registered"):
        lowbit.quantize(nn.Sequential(nn.Linear(16, 16)), {"quant_cfg": {"*weight_quantizer": {
            "num_bits": 4, "codebook": "no_such_book"}}, "algorithm": "max"})
    with pytest.raises(ValueError, match="5 levels; num_bits=2 holds 4"):
        lowbit.parse_config({"quant_cfg": {"*weight_quantizer": {"num_bits": 2, "codebook": "test_five_levels"}}})


def assert_on_grid(quantized: torch.Tensor, weight: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int) -> None:
    """float64: ``quantized`` is integer codes qmin..qmax times ``step`` (broadcast), each the nearest to the weight
    clipped to the grid's range (a weight within float32 rounding of a midpoint may take either neighbour)."""
    codes = quantized.double() / step
    assert torch.allclose(codes, codes.round(), rtol=0, atol=1e-3)
    assert codes.round().min() >= qmin and codes.round().max() <= qmax
    clipped = torch.minimum(torch.maximum(weight.double(), qmin * step), qmax * step)
    assert ((quantized.double() - clipped).abs() <= step * (0.5 + 1e-5)).all()


def shrink_weight_ranges(model: nn.Module, forward_loop, ratio: float) -> None:
    """A toy calibration algorithm: max calibration, then every enabled weight quantizer's amax times ``ratio``."""
    lowbit.calibrate(model, "max", forward_loop)
    for name, quantizer in lowbit.iter_quantizers(model):
        if name.endswith("weight_quantizer") and quantizer.is_enabled:
            quantizer.set_amax(quantizer.amax * ratio)


def test_an_algorithm_registered_outside_calibrates_and_runs():
    lowbit.register_algorithm("test_shrink", shrink_weight_ranges, {"ratio": 0.9})
    try:
        batches = [torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(seed)) for seed in (1, 2)]
        config = {"quant_cfg": {"*weight_quantizer": {"num_bits": 8, "axis": 0}},
                  "algorithm": {"method": "test_shrink", "ratio": 0.5}}
        model = lowbit.quantize(tiny_llama(), config, forward_loop_for(batches))
        reference = tiny_llama()
        for name, linear in model.named_modules():
            if not isinstance(linear, nn.Linear) or not linear.weight_quantizer.is_enabled:
                continue
            weight = reference.get_submodule(name).weight.detach().double()
            amax = 0.5 * weight.abs().amax(dim=1, keepdim=True)  # float64, from the definition
            torch.testing.assert_close(linear.weight_quantizer.amax.double(), amax, rtol=1e-7, atol=0)
            assert_on_grid(linear.weight_quantizer(linear.weight).detach(), weight, amax / 127, -128, 127)
        with torch.no_grad():
            logits = model(batches[0]).logits
        assert torch.isfinite(logits).all()
        with pytest.raises(TypeError, match="ratio='half'"):
            lowbit.parse_config({**config, "algorithm": {"method": "test_shrink", "ratio": "half"}})
    finally:
        lowbit.unregister_algorithm("test_shrink")
    with pytest.raises(ValueError, match="'test_shrink' is unknown"):
        lowbit.parse_config(config)


def export_fake_quant_weights(model: nn.Module, export_dir, *, tokenizer=None, overwrite: bool = False) -> Path:
    """A toy export target: each quantized weight as fake-quantized float32, and its format name, in one file."""
    tensors, formats = {}, {}
    for name, module in model.named_modules():
        quantizer = getattr(module, "weight_quantizer", None)
        if quantizer is not None and quantizer.is_enabled:
            tensors[f"{name}.weight"] = quantizer(module.weight).detach().float().contiguous()
            formats[f"{name}.weight"] = quantizer.config.format_name
    with atomic_directory(export_dir, "export_fake_quant_weights", overwrite) as directory:
        save_file(tensors, directory / "weights.safetensors")
        (directory / "formats.json").write_text(json.dumps(formats))
    return Path(export_dir)


def test_an_export_target_registered_outside_writes_a_file_that_reads_back(tmp_path):
    lowbit.register_exporter("test-fake-quant", export_fake_quant_weights)
    try:
        assert "test-fake-quant" in export_formats()
        config = {"quant_cfg": {"*weight_quantizer": {"num_bits": 4, "block_sizes": {-1: 32}}}, "algorithm": "max"}
        model = lowbit.quantize(tiny_llama(), config)
        written = lowbit.export(model, tmp_path / "out", format="test-fake-quant")
        tensors = load_file(written / "weights.safetensors")
        assert json.loads((written / "formats.json").read_text()) == dict.fromkeys(tensors, "int4")
        assert len(tensors) == 15  # 7 Linears in each of 2 layers and lm_head
        for key, tensor in tensors.items():
            weight = model.get_submodule(key.removesuffix(".weight")).weight.detach().double().unflatten(1, (-1, 32))
            step = weight.abs().amax(dim=-1, keepdim=True) / 7  # INT4 symmetric per group of 32, from the definition
            assert_on_grid(tensor.unflatten(1, (-1, 32)), weight, step, -8, 7)
    finally:
        lowbit.unregister_exporter("test-fake-quant")
