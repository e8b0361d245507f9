"""from_pretrained(path, quantization_config=LowbitConfig(cfg)): transformers' quantizer integration packs while
loading, and the result equals compress(quantize(model, cfg)) of a plain load, bit for bit."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import lowbit
from lowbit.compress import LowbitConfig
from lowbit.compress.convert import compress
from lowbit.compress.experts import CompressedExpertsMixin
from lowbit.compress.linear import CompressedLinear
from tests.modules.moe_models import experts_modules, tiny_mixtral


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)  # LlamaForCausalLM initialises from the global generator; the test owns this process
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


def _ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


def _config(preset: str) -> dict:
    config = copy.deepcopy(getattr(lowbit, preset.removesuffix("-asym")))
    if preset.endswith("-asym"):
        config["quant_cfg"]["*weight_quantizer"]["asymmetric"] = True
    return config


@pytest.mark.parametrize("preset", ["INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "W4A16_NVFP4_CFG",
                                    "FP8_PER_CHANNEL_PER_TOKEN_CFG", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG-asym"])
def test_loaded_model_equals_quantize_then_compress(checkpoint, preset):
    dense = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    expected = compress(lowbit.quantize(dense, _config(preset)))
    loaded = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16,
                                                  quantization_config=LowbitConfig(_config(preset)))
    compressed = [name for name, m in loaded.named_modules() if isinstance(m, CompressedLinear)]
    assert len(compressed) == 14 and "lm_head" not in compressed  # 7 Linears per layer; lm_head excluded
    assert not [name for name, p in loaded.named_parameters() if p.device.type == "meta"]
    with torch.no_grad():
        assert torch.equal(loaded(_ids()).logits, expected(_ids()).logits)


def test_fused_experts_load_packed_as_compress_packs_them(tmp_path):
    tiny_mixtral().to(torch.bfloat16).save_pretrained(tmp_path)
    preset = lowbit.INT4_BLOCKWISE_WEIGHT_ONLY_CFG
    expected = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    names = list(experts_modules(expected))
    compress(lowbit.quantize(expected, copy.deepcopy(preset)))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16,
                                                  quantization_config=LowbitConfig(copy.deepcopy(preset)))
    assert len(names) == 2 and all(isinstance(loaded.get_submodule(name), CompressedExpertsMixin) for name in names)
    with torch.no_grad():
        assert torch.equal(loaded(_ids()).logits, expected(_ids()).logits)


def test_allocator_warmup_is_told_the_packed_bytes(checkpoint):
    """transformers reserves param_element_size x numel per weight before loading on an accelerator: for a packed
    INT4 g128 weight that is its codes (1/2 byte each) and float32 scales (4 bytes per 128), computed here from
    the format's definition; the weights the preset leaves dense (lm_head, norms, embeddings) keep their size."""
    loaded = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16, quantization_config=LowbitConfig(
        copy.deepcopy(lowbit.INT4_BLOCKWISE_WEIGHT_ONLY_CFG)))
    quantizer = loaded.hf_quantizer
    skeleton = LlamaForCausalLM(loaded.config).to(torch.bfloat16)  # the dense layout transformers sizes
    quantizer._process_model_before_weight_loading(skeleton)
    for name, param in skeleton.named_parameters():
        size = quantizer.param_element_size(skeleton, name, param)
        if name.endswith("proj.weight"):
            out_features, in_features = param.shape
            expected = (out_features * in_features / 2 + out_features * in_features / 128 * 4) / param.numel()
            assert math.isclose(size, expected, rel_tol=1e-12), name
            assert quantizer.param_needs_quantization(skeleton, name)
        else:
            assert size == 2 and not quantizer.param_needs_quantization(skeleton, name), name


def test_bad_configs_fail_before_loading(checkpoint):
    with pytest.raises(ValueError, match="calibration data"):
        LowbitConfig(copy.deepcopy(lowbit.INT4_AWQ_CFG))
    with pytest.raises(ValueError, match="scale_dtype='int8'.*allowed"):
        LowbitConfig(copy.deepcopy(lowbit.INT4_BLOCKWISE_WEIGHT_ONLY_CFG), scale_dtype="int8")
    with pytest.raises(ValueError, match="num_bits"):
        LowbitConfig({"quant_cfg": {"*weight_quantizer": {"num_bits": 9}}, "algorithm": "max"})


def test_an_already_quantized_checkpoint_is_refused(checkpoint, tmp_path):
    """A checkpoint whose config.json says quant_method 'lowbit' is not a float checkpoint to pack."""
    config = LlamaConfig.from_pretrained(checkpoint)
    per_channel = {"quant_cfg": {"*weight_quantizer": {"num_bits": 8, "axis": 0}}, "algorithm": "max"}
    config.quantization_config = LowbitConfig(per_channel).to_dict()
    LlamaForCausalLM.from_pretrained(checkpoint).save_pretrained(tmp_path)
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="already quantized"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
