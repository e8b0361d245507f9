"""init_quantized_weights: Hugging Face loading straight into packed storage, equal to quantize + compress."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import lowbit
from lowbit.attributes import QuantizerAttributeConfig
from lowbit.compress import loading
from lowbit.compress.convert import compress
from lowbit.compress.linear import CompressedLinear
from lowbit.compress.loading import init_quantized_weights
from lowbit.compress.packed import WeightFormat, quantize_weight

BENCH = Path(__file__).resolve().parents[2] / "bench" / "memory.py"


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


FORMATS = [WeightFormat("int", 4, block_size=128), WeightFormat("int_asym", 4, block_size=64),
           WeightFormat("nvfp4", (2, 1), block_size=16), WeightFormat("float", (4, 3)),
           WeightFormat("int", 8, per_channel=True), WeightFormat("mx", (2, 1), block_size=32)]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda fmt: f"{fmt.kind}-{fmt.num_bits}")
def test_packing_row_chunks_equals_packing_the_whole_weight(monkeypatch, fmt):
    """Chunks of 3 rows (the last one short) written into preallocated storage: the same tensors, bit for bit."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(40, 256, generator=generator) * 0.05
    weight = torch.where(torch.rand(40, 256, generator=generator) < 0.01, weight * 30, weight).to(torch.bfloat16)
    monkeypatch.setattr(loading, "CHUNK_ELEMENTS", 3 * 256)
    attributes = QuantizerAttributeConfig.from_dict(_attributes(fmt))
    amin, amax = loading._weight_statistics(attributes, fmt, weight)
    chunked = loading._quantize_rows(weight, fmt, amin, amax, torch.float32)
    whole = quantize_weight(weight, fmt, amax=amax, amin=amin)
    assert chunked.tensors().keys() == whole.tensors().keys()
    for name, tensor in whole.tensors().items():
        assert chunked.tensors()[name].dtype == tensor.dtype
        assert torch.equal(chunked.tensors()[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8))


def _attributes(fmt: WeightFormat) -> dict:
    if fmt.kind == "nvfp4":
        return {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}}
    if fmt.kind == "mx":
        return {"num_bits": (2, 1), "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": (8, 0)}}
    granularity = {"block_sizes": {-1: fmt.block_size}} if fmt.block_size else {"axis": 0 if fmt.per_channel else None}
    return {"num_bits": fmt.num_bits, "asymmetric": fmt.kind == "int_asym", **granularity}


def test_loading_state_is_restored_on_exit_error_or_not(monkeypatch):
    """Inside the block weights assigned to a Linear built there are packed and transformers reads sequentially;
    after it (left by an exception) neither holds. GPU loads pack through LowbitConfig (test_hf_quantizer.py)."""
    monkeypatch.delenv(loading.HF_SEQUENTIAL_LOAD, raising=False)
    config = copy.deepcopy(lowbit.INT4_BLOCKWISE_WEIGHT_ONLY_CFG)
    state = {"0.weight": torch.randn(128, 128), "0.bias": torch.randn(128)}
    with pytest.raises(RuntimeError, match="inside"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with init_quantized_weights(config):
            assert os.environ[loading.HF_SEQUENTIAL_LOAD] == "1"
            inside = torch.nn.Sequential(torch.nn.Linear(128, 128))
            inside.load_state_dict(state, assign=True)
            assert inside[0].weight.device.type == "meta"  # packed, a placeholder until the block ends
            raise RuntimeError("inside")
    assert loading.HF_SEQUENTIAL_LOAD not in os.environ
    after = torch.nn.Sequential(torch.nn.Linear(128, 128))
    after.load_state_dict(state, assign=True)
    assert torch.equal(after[0].weight, state["0.weight"])


@pytest.mark.slow
def test_cpu_peak_memory_of_packed_loading_is_the_packed_model(tmp_path):
    """Fresh processes (bench/memory.py): the anonymous memory an INT4 load adds over a dense bf16 load (whose
    weights stay in the file mapping) is the packed weights plus some MB (quantizer modules, chunk temporaries).
    Before packing in small row chunks into preallocated storage with malloc_trim it was 54 MB more here."""
    def probe(*args: str) -> dict:
        out = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    probe("--save", str(tmp_path), "--hidden", "1024", "--layers", "4", "--intermediate", "4096", "--vocab", "1024")
    dense = probe("--probe", str(tmp_path))
    packed = probe("--probe", str(tmp_path), "--preset", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG")
    packed_bytes = packed["model"] - packed["mapped"]  # the packed Linears (embeddings, norms, lm_head stay mapped)
    excess = packed["peak_anon"] - dense["peak_anon"]
    print(f"anonymous peak over the dense load: {excess} B for {packed_bytes} B packed")
    assert excess <= packed_bytes + 24e6  # measured +13 MB; +54 MB before


def test_row_chunks_are_small_on_the_cpu_and_a_fraction_of_large_weights_elsewhere():
    """Chunks cover every row once and hold 2**18 elements; on accelerators (simulated on the meta device)
    a 64th of a larger weight."""
    def rows_per_chunk(shape, device):
        chunks = loading._row_chunks(torch.empty(shape, device=device))
        covered = [row for chunk in chunks for row in range(shape[0])[chunk]]
        assert covered == list(range(shape[0]))
        return chunks[0].stop - chunks[0].start

    assert rows_per_chunk((4096, 1024), "cpu") == 256
    assert rows_per_chunk((100, 300_000), "cpu") == 1  # a row longer than a chunk: one row at a time
    assert rows_per_chunk((4096, 1024), "meta") == 256
    assert rows_per_chunk((28672, 8192), "cpu") == 32
    assert rows_per_chunk((28672, 8192), "meta") == 28672 // 64
