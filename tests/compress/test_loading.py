"""init_quantized_weights: Hugging Face loading straight into packed storage, equal to quantize + compress."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import lowbit
from lowbit.compress.convert import compress
from lowbit.compress.linear import CompressedLinear
from lowbit.compress.loading import init_quantized_weights


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)  # LlamaForCausalLM initialises from the global generator; the test owns this process
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("preset", ["INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "W4A16_NVFP4_CFG",
                                    "FP8_PER_CHANNEL_PER_TOKEN_CFG", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG-asym"])
def test_loaded_model_equals_quantize_then_compress(checkpoint, preset):
    config = copy.deepcopy(getattr(lowbit, preset.removesuffix("-asym")))
    if preset.endswith("-asym"):
        config["quant_cfg"]["*weight_quantizer"]["asymmetric"] = True
    dense = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    expected = compress(lowbit.quantize(dense, copy.deepcopy(config)))
    with init_quantized_weights(copy.deepcopy(config)):
        loaded = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    compressed = [name for name, m in loaded.named_modules() if isinstance(m, CompressedLinear)]
    assert len(compressed) == 14 and "lm_head" not in compressed  # 7 Linears per layer; lm_head excluded
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected(ids).logits)


def test_rejects_data_driven_algorithms_and_warns_when_nothing_loads():
    with pytest.raises(ValueError, match="calibration data"):
        with init_quantized_weights(copy.deepcopy(lowbit.INT4_AWQ_CFG)):
            pass
    with pytest.raises(ValueError, match="scale_dtype"):
        with init_quantized_weights(copy.deepcopy(lowbit.INT4_BLOCKWISE_WEIGHT_ONLY_CFG), scale_dtype=torch.int8):
            pass
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with init_quantized_weights(copy.deepcopy(lowbit.INT4_BLOCKWISE_WEIGHT_ONLY_CFG)):
            torch.nn.Sequential(torch.nn.Linear(8, 8)).load_state_dict({"0.weight": torch.ones(8, 8),
                                                                        "0.bias": torch.ones(8)})
    assert any("packed no weight" in str(w.message) for w in caught)
