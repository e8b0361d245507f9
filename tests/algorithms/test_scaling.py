"""Input groups (linears sharing an input) and folding 1/s into the producing norm, on small blocks."""

import pytest
import torch
from torch import nn

import lowbit.convert as convert
from lowbit.algorithms.layerwise import LayerInputs, quantizers_disabled
from lowbit.algorithms.scaling import apply_input_scale
from lowbit.structure.groups import find_input_groups

INT8 = {"quant_cfg": {"*weight_quantizer": {"num_bits": 8, "axis": 0}, "*input_quantizer": {"num_bits": 8}},
        "algorithm": None}


class OnePlusNorm(nn.Module):
    """Gemma's RMSNorm: ``x / rms(x) * (1 + weight)``; dividing ``weight`` by s does not divide the output."""

    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(width))

    def forward(self, x):
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


class Block(nn.Module):
    def __init__(self, norm="layer", side_reader=False):
        super().__init__()
        self.norm = OnePlusNorm(16) if norm == "one_plus" else nn.LayerNorm(16)
        self.gate, self.up, self.down = nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(8, 16)
        self.expert = nn.Linear(16, 16)  # only reached by batches with a positive sum, like an MoE expert
        self.side = nn.GELU() if side_reader else None

    def forward(self, x):
        h = self.norm(x)
        out = x + self.down(self.gate(h) * self.up(h))
        if self.side is not None:
            out = out + self.side(h)
        if x.sum() > 0:
            out = out + self.expert(x)
        return out


def block_and_inputs(seed=0, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    block = Block(**kwargs)
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    convert.quantize(block, INT8)
    x = torch.randn(4, 16, generator=generator)
    calls = [(((-x.abs()),), {}), ((x.abs(),), {})]  # the expert is skipped by the first batch only
    return block, LayerInputs(calls)


def float_output(block, inputs):
    with quantizers_disabled(block):
        return next(inputs.forward(block))


def test_groups_follow_shared_inputs_across_batches():
    block, inputs = block_and_inputs()
    groups = find_input_groups(block, inputs)
    assert [sorted(g.linears) for g in groups] == [["gate", "up"], ["down"], ["expert"]]
    assert groups[0].norm is block.norm
    assert groups[1].norm is None and groups[2].norm is None


def test_fold_into_norm_keeps_the_float_output():
    block, inputs = block_and_inputs()
    group = find_input_groups(block, inputs)[0]
    reference = float_output(block, inputs)
    scale = torch.rand(16, generator=torch.Generator().manual_seed(5)) * 4 + 0.25
    gate_weight = block.gate.weight.detach().clone()
    assert apply_input_scale(group, scale) == "folded"
    torch.testing.assert_close(float_output(block, inputs), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(block.gate.weight, gate_weight * scale)
    assert block.gate.input_quantizer.pre_quant_scale is None


@pytest.mark.parametrize("kwargs", [{"side_reader": True}, {"norm": "one_plus"}])
def test_no_fold_when_the_norm_output_has_other_readers_or_a_different_formula(kwargs):
    block, inputs = block_and_inputs(**kwargs)
    group = find_input_groups(block, inputs)[0]
    norm_weight = block.norm.weight.detach().clone()
    scale = torch.full((16,), 2.0)
    assert apply_input_scale(group, scale) == "pre_quant_scale"
    assert torch.equal(block.norm.weight, norm_weight)  # an attempted fold is undone
    torch.testing.assert_close(block.up.input_quantizer.pre_quant_scale, torch.full((16,), 0.5))
    with pytest.raises(ValueError, match="already has a pre_quant_scale"):
        apply_input_scale(group, scale)


def test_awq_statistics_ride_on_a_pass_and_match_the_groups_and_float64_moments():
    """Collected by hooks during a float pass: the same groups as find_input_groups (the expert is traced in
    the second call), and per group X^T X, the row count and mean |X| of every input row (float64)."""
    from lowbit.algorithms.awq import AwqInputStatistics

    block, inputs = block_and_inputs()
    statistics = AwqInputStatistics(max_tokens=1000)  # more than the 8 rows: every row is kept
    norm_outputs = []
    handle = block.norm.register_forward_hook(lambda _m, _a, output: norm_outputs.append(output.double()))
    try:
        with statistics.watching(block, inputs), quantizers_disabled(block):
            list(inputs.forward(block))
    finally:
        handle.remove()
    expected = find_input_groups(block, inputs)
    assert [list(g.linears) for g in statistics.groups] == [list(g.linears) for g in expected]
    assert statistics.groups[0].norm is block.norm
    gram, rows, mean = statistics.group_input(statistics.groups[0])
    x = torch.cat(norm_outputs)
    assert rows == x.shape[0] == 8
    torch.testing.assert_close(gram.double(), x.T @ x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mean.double(), x.abs().mean(dim=0), rtol=1e-6, atol=1e-7)
    _, expert_rows, _ = statistics.group_input(statistics.groups[2])
    assert expert_rows == 4  # only the second call reached the expert
