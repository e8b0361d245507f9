"""The structure layer on small models: block stacks, records of every built-in kind, the float-left summary."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lowbit
from lowbit.presets import get_preset
from lowbit.structure.blocks import find_block_stacks
from lowbit.structure.coverage import weight_coverage
from lowbit.structure.weights import quantizable_weights
from tests.structure.families import SmallCNN, batches, build


def test_block_stacks_whatever_the_path():
    stacks = {name: [n for n, _ in find_block_stacks(lowbit.quantize(build(name), get_preset("INT8_WEIGHT_ONLY_CFG")))]
              for name in ("gpt2", "opt", "t5", "bert")}
    assert stacks == {"gpt2": ["transformer.h"], "opt": ["model.decoder.layers"],
                      "t5": ["encoder.block", "decoder.block"], "bert": ["encoder.layer"]}


def test_records_view_each_weight_as_out_by_in_and_write_through():
    model = lowbit.quantize(build("gpt2"), get_preset("INT8_WEIGHT_ONLY_CFG"))
    record = quantizable_weights(model)["transformer.h.0.mlp.c_fc"]
    assert record.kind == "transposed" and (record.out_features, record.in_features) == (256, 128)
    new = torch.randn(256, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        record.weight.copy_(new)
    torch.testing.assert_close(model.transformer.h[0].mlp.c_fc.weight, new.t(), rtol=0, atol=0)
    seen = []
    handle = record.observe_inputs(seen.append)
    with torch.no_grad():
        model(**batches("gpt2")[0])
    handle.remove()
    assert len(seen) == 1 and seen[0].shape[-1] == 128


def test_no_blocks_is_a_config_error_before_the_model_is_touched():
    model = SmallCNN()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    config = get_preset("INT8_DEFAULT_CFG")
    config["algorithm"] = "smoothquant"
    with pytest.raises(ValueError, match="SmallCNN has no repeated blocks"):
        lowbit.quantize(model, config, lambda m: m(torch.randn(2, 3, 8, 8)))
    assert not any(hasattr(m, "weight_quantizer") for m in model.modules())
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def test_coverage_counts_matrices_and_bytes_against_the_parameters():
    """GPT-2 INT8 weight-only: every Conv1D quantized; wte, wpe (embeddings) and the tied lm_head float, once."""
    model = lowbit.quantize(build("gpt2"), get_preset("INT8_WEIGHT_ONLY_CFG"))
    coverage = weight_coverage(model)
    conv1d = [m.weight for m in model.modules() if type(m).__name__ == "QuantConv1D"]
    assert (coverage["transposed"].total, coverage["transposed"].quantized) == (len(conv1d), len(conv1d)) == (8, 8)
    assert coverage["transposed"].quantized_bytes == sum(w.numel() * 4 for w in conv1d)
    embeddings = [model.transformer.wte.weight, model.transformer.wpe.weight]
    assert (coverage["embedding"].total, coverage["embedding"].quantized) == (2, 0)
    assert coverage["embedding"].total_bytes == sum(w.numel() * 4 for w in embeddings)  # lm_head counted once
    assert set(coverage) == {"transposed", "embedding"} and coverage["embedding"].unruled_bytes == 0


class Custom(nn.Module):
    """A matrix lowbit has no kind for (like fused experts before they had one), beside a Linear."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 64)
        self.table = nn.Parameter(torch.randn(4, 64, 64))

    def forward(self, x):
        return self.linear(x) + torch.einsum("bi,eio->bo", x, self.table)


def test_warns_when_float_bytes_no_rule_names_pass_20_percent():
    model = Custom()
    with pytest.warns(UserWarning, match=r"80% of the model's weight bytes stay float.*experts 65,536 bytes"):
        lowbit.quantize(model, get_preset("INT8_WEIGHT_ONLY_CFG"))
    coverage = weight_coverage(model)
    assert (coverage["experts"].total, coverage["experts"].quantized) == (4, 0)


def test_a_disable_rule_is_a_rule():
    model = Custom()
    config = get_preset("INT8_WEIGHT_ONLY_CFG")
    config["quant_cfg"]["*linear*"] = {"enable": False}
    model.table = nn.Parameter(torch.randn(1, 8, 8))  # small: 256 of 16,640 bytes unruled
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lowbit.quantize(model, config)
    assert weight_coverage(model)["linear"].quantized == 0
