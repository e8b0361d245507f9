"""Layer selection: each sensitivity metric and the ratio rule against references written from NNCF's
definitions (float64), and the first/last-layer rules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.weight_compression import SensitivityMetric, compress_weights
from lowbit.weight_compression.sensitivity import select_primary

from . import reference

SIZES = [48, 64, 96, 32, 64, 96, 48, 64, 16]  # eight Linear layers, the last one is the output head
RATIO = 0.4
SEED = 5  # with SIZES and RATIO: five metrics, five different selections


def _dataset(generator: torch.Generator) -> list[torch.Tensor]:
    """Three inputs of shape (2, tokens, 48) with a few outlier channels and varying token counts."""
    items = []
    for tokens in (10, 7, 12):
        x = torch.randn(2, tokens, SIZES[0], generator=generator)
        x[..., :3] *= 20
        items.append(x)
    return items


def _layer_inputs(model: nn.Sequential, items: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """For each Linear, its float64 input in every call (the stack run by hand: linear, relu, ...)."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    inputs = [[] for _ in linears]
    for x in items:
        activation = x.double()
        for index, linear in enumerate(linears):
            inputs[index].append(activation)
            activation = torch.relu(activation @ linear.weight.detach().double().T)
    return inputs


def _statistic(x: torch.Tensor, metric: SensitivityMetric) -> float:
    if metric == SensitivityMetric.HESSIAN_INPUT_ACTIVATION:
        return float(2 * (x**2).sum() / x.numel())
    centered = x - x.mean(dim=-2, keepdim=True)
    variance = (centered**2).mean(dim=-2)
    if metric == SensitivityMetric.MEAN_ACTIVATION_VARIANCE:
        return float(variance.mean())
    if metric == SensitivityMetric.MAX_ACTIVATION_VARIANCE:
        return float(variance.max())
    return float(x.abs().max(dim=-2).values.mean())  # MEAN_ACTIVATION_MAGNITUDE


def _reference_selection(model: nn.Sequential, items, metric: SensitivityMetric, ratio: float) -> set[int]:
    """Indices of the Linear layers that NNCF's definition puts in 4 bits (the last one never is)."""
    linears = [m for m in model if isinstance(m, nn.Linear)][:-1]
    inputs = _layer_inputs(model, items)
    scores = []
    for index, linear in enumerate(linears):
        weight = linear.weight.detach()
        error = reference.int_asym(weight, 8, -1) - weight.double()
        if metric == SensitivityMetric.HESSIAN_INPUT_ACTIVATION:
            weight_term = float(torch.sqrt((error**2).sum()))
        else:
            weight_term = 1 / (float((error**2).mean(dim=1).max()) + 2.0**-23)
        if metric == SensitivityMetric.WEIGHT_QUANTIZATION_ERROR:
            scores.append(weight_term)
        else:
            calls = [_statistic(x, metric) for x in inputs[index]]
            scores.append(weight_term * sum(calls) / len(calls))
    sizes = [linear.weight.numel() for linear in linears]
    chosen, taken = set(), 0
    for index in sorted(range(len(scores)), key=lambda i: (scores[i], i)):
        if (taken + sizes[index]) / sum(sizes) >= ratio:
            break
        chosen.add(index)
        taken += sizes[index]
    return chosen


def _four_bit_layers(model: nn.Sequential) -> set[int]:
    linears = [m for m in model if isinstance(m, nn.Linear)]
    return {i for i, m in enumerate(linears) if m.weight_quantizer.is_enabled and m.weight_quantizer.num_bits == 4}


@pytest.mark.parametrize("metric", list(SensitivityMetric), ids=lambda m: m.value)
def test_selection_matches_definition(metric):
    generator = torch.Generator().manual_seed(SEED)
    model = reference.linear_stack(SIZES, generator)
    items = _dataset(generator)
    expected = _reference_selection(model, items, metric, RATIO)
    dataset = items if metric.is_data_aware else None
    compress_weights(model, mode="int4_asym", group_size=16, ratio=RATIO, dataset=dataset, sensitivity_metric=metric,
                     packed=False)
    assert _four_bit_layers(model) == expected
    assert 0 < len(expected) < len(SIZES) - 2


def test_metrics_disagree_on_this_model():
    """Every metric selects differently on this model, so the test above catches a mix-up of metrics."""
    generator = torch.Generator().manual_seed(SEED)
    model = reference.linear_stack(SIZES, generator)
    items = _dataset(generator)
    selections = {frozenset(_reference_selection(model, items, m, RATIO)) for m in SensitivityMetric}
    assert len(selections) == len(SensitivityMetric)


def test_ratio_rule_stops_at_the_first_layer_that_does_not_fit():
    sizes, scores = [10, 10, 10, 70], [1.0, 2.0, 3.0, 0.0]
    assert select_primary(sizes, scores, 0.5) == []  # the 70 comes first and would reach 0.7
    assert select_primary(sizes, scores, 0.8) == [3]  # then layer 0 would reach exactly 0.8: stop
    assert select_primary(sizes, scores, 0.81) == [0, 3]
    assert select_primary(sizes, scores, 1.0) == [0, 1, 2, 3]
    assert select_primary(sizes, scores, 0.0) == []
    assert select_primary([25] * 4, [5.0] * 4, 0.6) == [0, 1]  # ties: layer order
    with pytest.raises(ValueError, match="scores"):
        select_primary([1, 2], [0.0], 0.5)


def _tiny_llama(tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=128, vocab_size=96, tie_word_embeddings=tie)
    torch.manual_seed(0)  # transformers initialises from the global RNG; only the test touches it
    return LlamaForCausalLM(config).eval()


def _bits(model) -> dict[str, int | None]:
    return {name: (m.weight_quantizer.num_bits if m.weight_quantizer.is_enabled else None)
            for name, m in model.named_modules() if hasattr(m, "weight_quantizer")}


def test_first_and_last_layers_stay_8_bit_unless_all_layers():
    model = compress_weights(_tiny_llama(), mode="int4_sym", group_size=32, packed=False)
    bits = _bits(model)
    assert bits.pop("model.embed_tokens") == 8 and bits.pop("lm_head") == 8
    assert set(bits.values()) == {4}
    model = compress_weights(_tiny_llama(), mode="int4_sym", group_size=32, all_layers=True, packed=False)
    assert set(_bits(model).values()) == {4}


def test_tied_head_follows_the_embedding_and_the_last_untied_matmul_joins_the_ratio():
    model = _tiny_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    compress_weights(model, mode="int4_asym", group_size=32, packed=False)
    bits = _bits(model)
    assert bits["lm_head"] == bits["model.embed_tokens"] == 8
    assert bits["model.layers.1.mlp.down_proj"] == 4  # not the last layer: the head is the embedding's


def test_int8_modes_compress_every_layer():
    model = compress_weights(_tiny_llama(), mode="int8_sym", packed=False)
    assert set(_bits(model).values()) == {8}
