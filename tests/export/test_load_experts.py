"""Round trip for fused MoE experts: export (per-expert tensors) -> load_quantized -> the same model.

Tiny Qwen3-MoE and Mixtral (tests/modules/moe_models.py: seeded random weights, 8 experts, 2 layers) quantized
with FP8 (static per-tensor weights and inputs) and INT4 g128 weight-only, exported as ModelOpt-HF and
compressed-tensors, reloaded: the experts come back compressed (packed codes), their dequantized weights equal
lowbit's fake-quantized ones to one float32 rounding of the exported reciprocal scale, and the logits agree with
the in-memory model within 1e-5 relative (as dense layers do in test_export.py; measured 1.5e-7 .. 3.7e-7)."""

import copy

import pytest
import torch

import lowbit
from lowbit.compress.experts import CompressedExpertsMixin
from lowbit.export import export
from lowbit.export.load import load_quantized
from tests.modules.moe_models import NUM_EXPERTS, needs_fused_experts, tiny_mixtral, tiny_qwen3_moe

pytestmark = needs_fused_experts
ROUND_TRIP_RTOL = 1e-5
CASES = [(tiny_qwen3_moe, "FP8_DEFAULT_CFG", "hf"), (tiny_mixtral, "FP8_DEFAULT_CFG", "compressed-tensors"),
         (tiny_mixtral, "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "hf"),
         (tiny_qwen3_moe, "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "compressed-tensors")]


def _quantized(build, cfg):
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    return lowbit.quantize(build(), cfg, lambda m: m(tokens))


def _logits(model):
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(9))  # not the calibration tokens
    with torch.no_grad():
        return model(ids).logits.double()


@pytest.mark.parametrize("build,cfg_name,target", CASES)
def test_experts_round_trip(build, cfg_name, target, tmp_path):
    model = _quantized(build, copy.deepcopy(getattr(lowbit, cfg_name)))
    reloaded = load_quantized(export(model, tmp_path / "out", target))
    for index, layer in enumerate(reloaded.model.layers):
        experts = layer.mlp.experts
        assert isinstance(experts, CompressedExpertsMixin)
        original = model.model.layers[index].mlp.experts
        for projection in ("gate_up_proj", "down_proj"):
            expected = original.quantized_expert_weight(projection).detach().double()
            actual = experts.dequantized_expert_weight(projection).double()
            assert actual.shape == (NUM_EXPERTS, *expected.shape[1:])
            assert torch.all((actual - expected).abs() <= 2.0**-22 * expected.abs())  # the reciprocal's rounding
        if cfg_name.startswith("FP8"):  # each expert's static input amax
            stacked = original.gate_up_proj_input_quantizer.amax.double().reshape(-1)
            restored = experts.gate_up_proj_input_quantizer.amax.double().reshape(-1)
            assert torch.allclose(restored, stacked, rtol=2.0**-22, atol=0)
    expected, actual = _logits(model), _logits(reloaded)
    assert (actual - expected).norm() <= ROUND_TRIP_RTOL * expected.norm()


def test_float_experts_reload_as_float(tmp_path):
    cfg = copy.deepcopy(lowbit.FP8_DEFAULT_CFG)
    cfg["quant_cfg"]["*experts*"] = {"enable": False}
    model = _quantized(tiny_mixtral, cfg)
    reloaded = load_quantized(export(model, tmp_path / "out", "hf"))
    experts, original = reloaded.model.layers[1].mlp.experts, model.model.layers[1].mlp.experts
    assert not isinstance(experts, CompressedExpertsMixin)
    assert torch.equal(experts.gate_up_proj, original.gate_up_proj) and torch.equal(experts.down_proj,
                                                                                   original.down_proj)
    expected, actual = _logits(model), _logits(reloaded)
    assert (actual - expected).norm() <= ROUND_TRIP_RTOL * expected.norm()


def test_partly_quantized_experts_are_refused_by_name(tmp_path):
    cfg = copy.deepcopy(lowbit.INT4_BLOCKWISE_WEIGHT_ONLY_CFG)
    cfg["quant_cfg"]["*down_proj_weight_quantizer"] = {"enable": False}
    model = _quantized(tiny_qwen3_moe, cfg)
    directory = export(model, tmp_path / "out", "hf")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts: 16 of its 24 per-expert layers are "
                                         r"quantized"):
        load_quantized(directory)
