"""compress_weights' contract: validation before mutation, backup modes, ignored scope, dataset shapes,
refinements, the summary's sizes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lowbit.modules import is_quantized
from lowbit.weight_compression import (
    BackupMode,
    CompressWeightsMode,
    SensitivityMetric,
    check_options,
    compress_weights,
    plan_compression,
)

from . import reference


def _model(seed: int = 0) -> nn.Sequential:
    return reference.linear_stack([64, 128, 64, 32], torch.Generator().manual_seed(seed))


def _inputs(count: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(2, 8, 64, generator=generator) for _ in range(count)]


ERRORS = [
    (dict(mode="int3_sym"), ValueError, "mode='int3_sym': allowed are"),
    (dict(mode="int8_asym", ratio=0.5), ValueError, r"\['ratio'\] do not apply"),
    (dict(mode="int8_sym", group_size=64), ValueError, r"\['group_size'\] do not apply"),
    (dict(mode="int8_asym", sensitivity_metric="hessian_input_activation"), ValueError, "do not apply"),
    (dict(mode="int4_asym", sensitivity_metric="max_activation_variance"), ValueError, "need calibration data"),
    (dict(mode="int4_sym", awq=True), ValueError, r"\['awq'\] need calibration data"),
    (dict(mode="int4_sym", sensitivity_metric="kl"), ValueError, "sensitivity_metric='kl'"),
    (dict(mode="int4_sym", group_size=0), ValueError, "group_size=0"),
    (dict(mode="int4_sym", group_size=True), ValueError, "group_size=True"),
    (dict(mode="int4_sym", group_size=48), ValueError, r"does not divide the input size of \['0 \(in=64\)', '2 \(in"),
    (dict(mode="mxfp4", group_size=64), ValueError, "blocks of 32"),
    (dict(mode="int4_sym", ratio=1.5), ValueError, r"ratio=1.5: expected a number in \[0, 1\]"),
    (dict(mode="int4_sym", ratio="half"), ValueError, "ratio='half'"),
    (dict(mode="int4_sym", all_layers=1), TypeError, "all_layers=1"),
    (dict(mode="mxfp4", scale_estimation=True, dataset=_inputs()), ValueError, "MX block scales are dynamic"),
    (dict(mode="mxfp4", gptq=True, dataset=_inputs()), ValueError, r"\['gptq'\] with mode=mxfp4"),
    (dict(backup_mode="int4_asym"), ValueError, "backup_mode='int4_asym'"),
    (dict(ignored_scope=["0", "nothing*"]), ValueError, r"\['nothing\*'\] match no compressible layer"),
    (dict(ignored_scope="0"), TypeError, "not one string"),
    (dict(dataset=[]), ValueError, "dataset is empty"),
    (dict(dataset=torch.zeros(2, 8, 64)), TypeError, "got one Tensor"),
    (dict(packed="yes"), TypeError, "packed='yes'"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), ERRORS, ids=[str(i) for i in range(len(ERRORS))])
def test_errors_name_the_argument_and_leave_the_model_alone(kwargs, error, message):
    model = _model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(error, match=message):
        compress_weights(model, **kwargs)
    assert not any(is_quantized(m) for m in model.modules())
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def test_not_a_model():
    with pytest.raises(TypeError, match="expected an nn.Module"):
        compress_weights(object())


def test_a_failed_refinement_reverts_the_conversion():
    """A plain Sequential has no decoder layers for AWQ; the error comes after quantize, which is undone."""
    model = _model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match="decoder layers"):
        compress_weights(model, mode="int4_sym", group_size=32, all_layers=True, awq=True, dataset=_inputs())
    assert not any(is_quantized(m) for m in model.modules())
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def test_backup_none_ignored_scope_and_strings():
    model = _model()
    compress_weights(model, mode="int4_asym", group_size=32, backup_mode="none", ignored_scope=["2"], packed=False)
    quantizers = {name: m.weight_quantizer for name, m in model.named_modules() if is_quantized(m)}
    assert not quantizers["2"].is_enabled  # ignored
    assert not quantizers["4"].is_enabled  # the last layer: backup mode NONE keeps it float
    assert quantizers["0"].is_enabled and quantizers["0"].num_bits == 4
    # layer 0 alone is 100% of the ratio-defining weights: at ratio 0.5 it takes the backup mode
    options = check_options("int4_asym", 32, 0.5, backup_mode=BackupMode.NONE)
    plan = plan_compression(_model(), options, ignored_scope=lambda name: name == "2")
    assert plan.primary_names == [] and [entry.format for entry in plan.layers] == [None, None]


def test_inputs_as_dicts_tuples_and_tensors_give_the_same_selection():
    class Keyword(nn.Module):
        def __init__(self, stack: nn.Sequential):
            super().__init__()
            self.stack = stack

        def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            return self.stack(x * scale)

    items = _inputs(3)
    options = check_options("int4_sym", 32, 0.6, True, SensitivityMetric.MEAN_ACTIVATION_MAGNITUDE)
    names = []
    for dataset in (items, [(x,) for x in items], [{"x": x, "scale": 1.0} for x in items]):
        names.append(plan_compression(Keyword(_model()), options, dataset).primary_names)
    assert names[0] == names[1] == names[2] and len(names[0]) == 1


def test_summary_sizes_follow_the_storage_formula():
    model = _model()
    options = check_options("int4_asym", 32)
    summary = plan_compression(model, options).summary()
    float_bytes = sum(p.numel() * 4 for p in model.parameters())
    # layers 0, 2 in int4_asym g32: 4 bits + (16 + 4) / 32 per weight; the last (4) in int8_asym
    expected = float_bytes - 4 * (64 * 128 + 128 * 64 + 64 * 32)
    expected += (128 * 64 * 4 + 128 * 2 * 20) // 8 + (64 * 128 * 4 + 64 * 4 * 20) // 8
    expected += 32 * 64 + 32 * (16 + 8) // 8
    assert summary.original_bytes == float_bytes
    assert summary.compressed_bytes == expected
    assert [row.format for row in summary.layers] == ["int4_asym g32", "int4_asym g32", "int8_asym per-channel"]
    text = summary.table()
    assert "int4_asym g32" in text and "ratio-defining" in text and "MiB" in text


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=128, vocab_size=96)
    torch.manual_seed(0)  # transformers initialises from the global RNG; only the test touches it
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(2))
    return model, ids, [{"input_ids": ids[:1]}, {"input_ids": ids[1:]}]


def _relative_error(model, ids, reference_logits):
    with torch.no_grad():
        logits = model(ids).logits
    return float((logits - reference_logits).square().mean() / reference_logits.square().mean())


def test_refinements_run_on_a_decoder_model():
    """awq + scale_estimation (awq_full: NF4 gets the clip search) then gptq: the output stays close to float."""
    model, ids, dataset = _tiny_llama()
    with torch.no_grad():
        reference_logits = model(ids).logits
    compress_weights(model, mode=CompressWeightsMode.NF4, group_size=32, dataset=dataset, awq=True,
                     scale_estimation=True, gptq=True)
    assert model.model.layers[0].mlp.up_proj.weight_quantizer.config.codebook == "nf4"
    assert 0 < _relative_error(model, ids, reference_logits) < 0.1


@pytest.mark.parametrize("mode", ["int4_asym", "int4_sym"])
def test_scale_estimation_improves_each_path(mode):
    """On a tiny Llama (group 32, packed): scale_estimation alone and gptq + scale_estimation bring the logits
    closer to float than the data-free compression; awq + scale_estimation closer than awq alone."""
    model, ids, dataset = _tiny_llama()
    with torch.no_grad():
        reference_logits = model(ids).logits

    def error(**flags):
        compressed = compress_weights(copy.deepcopy(model), mode=mode, group_size=32,
                                      dataset=dataset if flags else None, **flags)
        return _relative_error(compressed, ids, reference_logits)

    data_free = error()
    assert 0 < error(scale_estimation=True) < data_free
    assert 0 < error(gptq=True, scale_estimation=True) < data_free
    assert 0 < error(awq=True, scale_estimation=True) < error(awq=True)


def test_asymmetric_awq_and_gptq_keep_a_zero_point():
    model, ids, dataset = _tiny_llama()
    compress_weights(model, mode="int4_asym", group_size=32, dataset=dataset, awq=True, gptq=True, packed=False)
    quantizer = model.model.layers[0].mlp.up_proj.weight_quantizer
    assert quantizer.amin is not None and quantizer.amin.shape == quantizer.amax.shape
    assert torch.all(quantizer.amin <= 0) and torch.all(quantizer.amax >= 0)


def test_packed_storage_matches_fake_quantization():
    """Linear layers are packed (fp16 scales); NF4 and embeddings stay fake-quantized; the outputs agree with
    the fake-quantized model up to the fp16 rounding of the scales."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.compress import CompressedLinear
    from lowbit.weight_compression.layers import QuantEmbedding

    config = LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=128, vocab_size=96)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(3))
    logits = {}
    for packed in (False, True):
        for mode in ("int4_asym", "nf4"):
            torch.manual_seed(0)  # transformers initialises from the global RNG; only the test touches it
            model = compress_weights(LlamaForCausalLM(config).eval(), mode=mode, group_size=32, packed=packed)
            with torch.no_grad():
                logits[packed, mode] = model(ids).logits
            layers = model.model.layers[0]
            assert isinstance(model.model.embed_tokens, QuantEmbedding)
            assert isinstance(model.lm_head, CompressedLinear) == packed  # int8_asym backup
            assert isinstance(layers.mlp.up_proj, CompressedLinear) == (packed and mode == "int4_asym")
    for mode in ("int4_asym", "nf4"):
        error = (logits[True, mode] - logits[False, mode]).square().mean() / logits[False, mode].square().mean()
        assert error < 1e-5
