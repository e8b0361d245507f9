"""Fused MoE experts (transformers >= 5.20) exported as the per-expert tensors of the original checkpoints:
every expert's gate / up / down projection under the names vLLM's Mixtral and Qwen-MoE loaders read
(``experts.{e}.w1/w3/w2`` under ``block_sparse_moe`` for Mixtral, ``experts.{e}.gate_proj/up_proj/down_proj``
for Qwen), no fused 3-D tensor left, and each expert's dequantized weight (FP8 codes x per-channel divisor,
computed here in float64) equal to the matching rows of lowbit's fake-quantized fused weight within two float32
roundings (the divisor's and lowbit's division)."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import lowbit
from lowbit.export import export
from tests.modules.moe_models import NUM_EXPERTS, needs_fused_experts, tiny_mixtral, tiny_qwen3_moe

pytestmark = needs_fused_experts
NAMES = {"mixtral": ("block_sparse_moe", "w1", "w3", "w2"), "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj")}


def _quantized(build, cfg_name="FP8_PER_CHANNEL_PER_TOKEN_CFG"):
    model = build()
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    return lowbit.quantize(model, copy.deepcopy(getattr(lowbit, cfg_name)), lambda m: m(tokens))


@pytest.mark.parametrize("target", ["hf", "compressed-tensors"])
@pytest.mark.parametrize("build", [tiny_mixtral, tiny_qwen3_moe])
def test_experts_are_written_per_expert_with_lowbit_weights(build, target, tmp_path):
    model = _quantized(build)
    export(model, tmp_path / "out", target)
    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    block, gate, up, down = NAMES[model.config.model_type]
    assert not [k for k in state if k.endswith(("gate_up_proj", "experts.down_proj"))]
    assert block == "mlp" or not [k for k in state if ".mlp." in k]
    for index, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts
        fused = {p: experts.quantized_expert_weight(p).detach().double() for p in ("gate_up_proj", "down_proj")}
        rows = fused["gate_up_proj"].shape[1] // 2
        for expert in range(NUM_EXPERTS):
            prefix = f"model.layers.{index}.{block}.experts.{expert}"
            expected = {gate: fused["gate_up_proj"][expert, :rows], up: fused["gate_up_proj"][expert, rows:],
                        down: fused["down_proj"][expert]}
            for short, reference in expected.items():
                weight, scale = state[f"{prefix}.{short}.weight"], state[f"{prefix}.{short}.weight_scale"]
                assert weight.dtype == torch.float8_e4m3fn and weight.shape == reference.shape
                values = weight.double() * scale.double().reshape(-1, 1)
                assert torch.all((values - reference).abs() <= 2.0**-22 * reference.abs())  # 2 roundings
    assert f"model.layers.0.{block}.gate.weight" in state  # the router, renamed with its block
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    ignored = config.get("ignore", config.get("exclude_modules", []))
    assert f"model.layers.1.{block}.gate" in ignored  # vLLM builds routers as linears: listed as unquantized


def test_unquantized_experts_are_written_per_expert_in_float(tmp_path):
    cfg = copy.deepcopy(lowbit.FP8_PER_CHANNEL_PER_TOKEN_CFG)
    cfg["quant_cfg"]["*experts*"] = {"enable": False}
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    model = lowbit.quantize(tiny_qwen3_moe(), cfg, lambda m: m(tokens))
    export(model, tmp_path / "out", "compressed-tensors")
    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    experts = model.model.layers[1].mlp.experts
    gate_up = experts.gate_up_proj.detach()
    assert torch.equal(state["model.layers.1.mlp.experts.5.up_proj.weight"], gate_up[5, gate_up.shape[1] // 2:])
    assert torch.equal(state["model.layers.1.mlp.experts.5.down_proj.weight"], experts.down_proj.detach()[5])
    assert "model.layers.1.mlp.experts.5.up_proj.weight_scale" not in state
    assert state["model.layers.1.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn


def test_unknown_family_with_fused_experts_is_refused(tmp_path):
    model = _quantized(tiny_qwen3_moe)
    model.config.model_type = "someone_elses_moe"
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts: fused experts of "
                                         r"model_type='someone_elses_moe' have no per-expert checkpoint layout"):
        export(model, tmp_path / "out", "hf")
    assert not (tmp_path / "out").exists()


@pytest.mark.consumer
@pytest.mark.parametrize("cfg_name", ["FP8_PER_CHANNEL_PER_TOKEN_CFG", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG"])
@pytest.mark.parametrize("build", [tiny_mixtral, tiny_qwen3_moe])
def test_transformers_reloads_per_expert_compressed_tensors(build, cfg_name, tmp_path):
    """transformers (with compressed-tensors) merges the per-expert tensors back into its fused experts:
    logits within 1e-2 relative of lowbit's model (measured 3e-7 for INT4 g128, 7e-4 / 2.5e-3 for FP8 per-token
    with transformers 5.25 + compressed-tensors 0.20)."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    model = _quantized(build, cfg_name)
    model.config.architectures = [type(model).__name__]
    export(model, tmp_path / "out", "compressed-tensors")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected, actual = model(tokens).logits, reloaded(tokens).logits
    assert (actual - expected).norm() <= 1e-2 * expected.norm()
