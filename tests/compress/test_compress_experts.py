"""compress() on fused MoE experts: every expert weight packed, bytes, outputs equal to fake quantization,
save_compressed / load_compressed round trip.

The byte budget (issue 17): a tiny Mixtral / Qwen3-MoE (8 experts, seeded weights) held in bfloat16,
INT4 g128 weight-only, packed with the default float32 scales: the model's real bytes without the input
embedding at most 0.30x the bf16 model's (lm_head and the router gates stay bf16 and count).
Outputs: compressed logits equal fake-quant logits exactly on the CPU (same weights bit for bit, same
F.linear), as for CompressedLinear.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.compress import compress, compressed_weight_bytes, load_compressed, save_compressed
from lowbit.compress.experts import CompressedExpertsMixin
from lowbit.eval.size import model_size
from tests.modules.moe_models import (
    MOE_FAMILIES,
    experts_modules,
    needs_fused_experts,
    tiny_mixtral,
    tiny_qwen3_moe,
)

pytestmark = needs_fused_experts

NVFP4 = {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}}
FORMATS = {
    "int4_g128": {"num_bits": 4, "block_sizes": {-1: 128}},
    "int4_asym_g64": {"num_bits": 4, "block_sizes": {-1: 64}, "asymmetric": True},
    "int8_per_channel": {"num_bits": 8, "axis": 0},
    "fp8": {"num_bits": (4, 3), "axis": None},
    "nvfp4": NVFP4,
    "mxfp4": {"num_bits": (2, 1), "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": (8, 0)}},
}


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(seed))


def _quantized(build, weight: dict, activations: dict | None = None, weights: str = "*weight_quantizer"):
    model = build()
    rules = {weights: weight, "*lm_head*": {"enable": False}, "default": {"enable": False}}
    if activations is not None:
        rules["*experts*input_quantizer"] = activations
    ids = _ids()
    lowbit.quantize(model, {"quant_cfg": rules, "algorithm": "max"}, lambda m: m(ids))
    return model


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_compressed_experts_equal_fake_quantization(name):
    # Experts only: compressed INT4 / INT8 Linears run torch's CPU kernels, which are not bit-exact.
    model = _quantized(tiny_qwen3_moe, FORMATS[name], {"num_bits": 8, "axis": None} if name == "int8_per_channel"
                       else None, weights="*experts*weight_quantizer")
    experts = {n: m for n, m in experts_modules(model).items()}
    fake = {n: {p: m.quantized_expert_weight(p).detach() for p in m.projections} for n, m in experts.items()}
    ids = _ids(1)
    with torch.no_grad():
        expected = model(ids).logits
        compress(model)
        actual = model(ids).logits
    assert torch.equal(actual, expected)
    for module_name, weights in fake.items():
        module = model.get_submodule(module_name)
        assert isinstance(module, CompressedExpertsMixin)
        for projection, weight in weights.items():
            assert torch.equal(module.dequantized_expert_weight(projection, weight.dtype), weight), projection


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_int4_g128_packs_every_expert_within_030_of_bf16(family):
    model = MOE_FAMILIES[family]().to(torch.bfloat16)
    embedding = model.get_input_embeddings().weight
    bf16_bytes = model_size(model) - embedding.numel() * embedding.element_size()
    expert_numel = sum(p.numel() for p in model.parameters() if p.dim() == 3)
    ids = _ids()
    lowbit.quantize(model, lowbit.presets.INT4_BLOCKWISE_WEIGHT_ONLY_CFG, lambda m: m(ids))
    compress(model)
    packed_bytes = model_size(model) - embedding.numel() * embedding.element_size()
    three_d = [n for n, p in model.named_parameters() if p.dim() == 3]
    assert three_d == [], f"expert weights left dense: {three_d}"
    compressed = [m for m in model.modules() if isinstance(m, CompressedExpertsMixin)]
    assert len(compressed) == model.config.num_hidden_layers
    assert packed_bytes <= 0.30 * bf16_bytes, (packed_bytes, bf16_bytes, packed_bytes / bf16_bytes)
    packed, dense = compressed_weight_bytes(model)
    assert dense >= 2 * expert_numel  # the experts are in the count
    assert packed / dense == pytest.approx((0.5 + 4 / 128) / 2, rel=1e-9)  # a nibble + a f32 scale per 128


def test_save_load_compressed_round_trip(tmp_path):
    model = _quantized(tiny_mixtral, FORMATS["int4_g128"], {"num_bits": (4, 3), "axis": None})
    compress(model)
    ids = _ids(2)
    with torch.no_grad():
        expected = model(ids).logits
    save_compressed(model, tmp_path / "moe")
    loaded = load_compressed(tiny_mixtral, tmp_path / "moe")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
    module = loaded.model.layers[0].mlp.experts
    assert isinstance(module, CompressedExpertsMixin)
    assert module.gate_up_proj_input_quantizer.amax.shape == (module.num_experts,)


def test_unsupported_expert_format_is_refused_before_anything_changes():
    model = tiny_mixtral()
    rules = {"*experts*weight_quantizer": {"num_bits": 4, "block_sizes": {-2: 64}},  # blocks along out: no storage
             "*self_attn*weight_quantizer": FORMATS["int4_g128"], "default": {"enable": False}}
    lowbit.quantize(model, {"quant_cfg": rules})
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts \(fused experts\): block_sizes"):
        compress(model)
    assert [type(m) for m in model.modules()] == before
    assert all(isinstance(p, nn.Parameter) for p in model.model.layers[0].mlp.experts.parameters())


def test_packed_weight_bytes_estimate_counts_experts_as_compress_stores_them():
    """lowbit.report's estimate from the quantizer attributes (16-bit block scales, bf16 elsewhere) equals the
    bytes compress(scale_dtype=float16) really stores plus the float parameters at 2 bytes."""
    from lowbit.report import packed_weight_bytes

    model = _quantized(tiny_qwen3_moe, FORMATS["int4_g128"])
    estimate = packed_weight_bytes(model)
    compress(model, scale_dtype=torch.float16)
    packed, _ = compressed_weight_bytes(model)
    floats = sum(p.numel() * 2 for p in model.parameters())
    assert estimate == packed + floats


def test_init_quantized_weights_packs_fused_experts_as_compress_does(tmp_path):
    """Loading straight into packed storage gives the experts compress(quantize(model)) gives, bit for bit."""
    from transformers import AutoModelForCausalLM

    from lowbit.compress import init_quantized_weights

    tiny_mixtral().to(torch.bfloat16).save_pretrained(tmp_path / "mixtral")
    preset = lowbit.presets.INT4_BLOCKWISE_WEIGHT_ONLY_CFG
    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "mixtral", dtype=torch.bfloat16)
    names = list(experts_modules(expected))
    assert len(names) == 2
    lowbit.quantize(expected, preset)
    compress(expected)
    with init_quantized_weights(preset):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "mixtral", dtype=torch.bfloat16)
    assert [n for n, p in loaded.named_parameters() if p.dim() == 3] == []
    for name in names:
        assert isinstance(loaded.get_submodule(name), CompressedExpertsMixin), name
    ids = _ids(3)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected(ids).logits)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("preset", ["INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "W4A16_NVFP4_CFG", "FP8_DEFAULT_CFG"])
def test_compressed_experts_match_fake_quant_on_cuda(preset):
    """On CUDA the experts run lowbit.kernels (Triton W4 for INT4) on each expert's packed slice: the
    weights equal the fake-quantized ones bit for bit, the bf16 logits agree within 2 % (relative norm;
    different accumulation orders, as tests/compress/test_compress_gpu.py allows)."""
    model = tiny_mixtral().to("cuda", torch.bfloat16)
    ids = _ids().cuda()
    lowbit.quantize(model, getattr(lowbit.presets, preset), lambda m: m(ids))
    experts = model.model.layers[0].mlp.experts
    weight = experts.quantized_expert_weight("down_proj").detach()
    with torch.no_grad():
        expected = model(ids).logits.double()
        compress(model)
        actual = model(ids).logits.double()
    assert torch.equal(model.model.layers[0].mlp.experts.dequantized_expert_weight("down_proj", torch.bfloat16),
                       weight)
    assert ((actual - expected).norm() / expected.norm()).item() < 2e-2
