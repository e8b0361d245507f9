"""quantize_layerwise (one decoder block at a time, from the shards) against the whole-model path.

Reference: ``lowbit.quantize`` + ``lowbit.compress`` of the same float32 model on the same batches, its state
dict (packed codes, scales, amax, pre_quant_scale, AWQ-folded norms). Tolerance: floats within 1e-6 relative
of each tensor's max, integer codes equal (measured: bit-identical, the same operations block by block).
"""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import lowbit
from lowbit import assets
from lowbit.compress.convert import compressible_linears
from lowbit.data import calibration_batches, make_forward_loop
from lowbit.hf import load_causal_lm
from lowbit.scale.memory import RUN_OVERHEAD, SKELETON_BYTES_PER_BLOCK, TEMPORARIES
from lowbit.scale.output import join_safetensors


def _gptq_int4() -> dict:
    config = lowbit.get_preset("INT4_BLOCKWISE_WEIGHT_ONLY_CFG")
    config["algorithm"] = {"method": "gptq", "block_size": 64}
    return config


def _awq_int4(block=128) -> dict:
    config = lowbit.get_preset("INT4_AWQ_CFG")
    config["quant_cfg"]["*weight_quantizer"]["block_sizes"] = {-1: block, "type": "static"}
    config["algorithm"] = {**config["algorithm"], "alpha_step": 0.25}
    return config


def _whole_model(model, config, batches) -> torch.nn.Module:
    quantized = lowbit.quantize(copy.deepcopy(model), config, make_forward_loop(batches, progress=False))
    return lowbit.compress(quantized) if compressible_linears(quantized) else quantized


def _whole_model_state(model, config, batches) -> dict[str, torch.Tensor]:
    return _whole_model(model, config, batches).state_dict()


def _assert_same_state(got: dict, reference: dict) -> None:
    assert got.keys() == reference.keys()
    for key, value in reference.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        if value.is_floating_point():
            scale = value.double().abs().max().clamp_min(1e-30)
            assert float((got[key].double() - value.double()).abs().max() / scale) <= 1e-6, key
        else:
            assert torch.equal(got[key], value), key


@pytest.fixture(scope="module")
def bundled():
    model, tokenizer = assets.load_default_model()
    batches = calibration_batches(tokenizer, assets.bundled_text("calibration"), num_samples=4, seq_len=48,
                                  batch_size=2)
    return model, batches


@pytest.mark.slow
@pytest.mark.parametrize("name, config", [("fp8_max", lowbit.get_preset("FP8_DEFAULT_CFG")),
                                          ("int4_awq_lite", _awq_int4()), ("int4_gptq", _gptq_int4())])
def test_bundled_model_same_quantizers_as_whole_model(bundled, tmp_path, name, config):
    model, batches = bundled
    whole = _whole_model(model, copy.deepcopy(config), batches)
    result = lowbit.quantize_layerwise(assets.default_model_path(), config, batches, tmp_path / "out",
                                       dtype=torch.float32)
    _assert_same_state(load_file(tmp_path / "out" / "model.safetensors"), whole.state_dict())
    assert [entry.name for entry in result.layers] == ([] if name == "fp8_max" else
                                                       [f"model.layers.{i}" for i in range(8)])
    loaded, _ = load_causal_lm(tmp_path / "out")  # the directory is save_compressed's, with config and tokenizer
    with torch.no_grad():
        assert torch.equal(loaded(**batches[0]).logits, whole(**batches[0]).logits)


def test_gpt2_fixture_tied_embeddings_single_file(tmp_path):
    """GPT-2: one model.safetensors, Conv1D weights, the head tied to the token embedding (not in the file)."""
    model, _ = assets.load_gpt2_model()
    generator = torch.Generator().manual_seed(2)
    batches = [{"input_ids": torch.randint(0, model.config.vocab_size, (2, 24), generator=generator)}
               for _ in range(2)]
    config = lowbit.get_preset("FP8_DEFAULT_CFG")
    whole = _whole_model(model, copy.deepcopy(config), batches)
    lowbit.quantize_layerwise(assets.gpt2_model_path(), config, batches, tmp_path / "out", dtype=torch.float32)
    written = load_file(tmp_path / "out" / "model.safetensors")
    reference = {k: v for k, v in whole.state_dict().items() if k != "transformer.wte.weight"}  # tied: stored
    _assert_same_state(written, reference)  # once, under the name save_compressed keeps


# ---- a tiny sharded Llama --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random Llama saved as bf16 safetensors shards; its float32 model and 4 token batches."""
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    generator = torch.Generator().manual_seed(7)
    with torch.random.fork_rng():
        model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            scale = 0.2 if "norm" in name else 0.08
            parameter.copy_(("norm" in name) + scale * torch.randn(parameter.shape, generator=generator))
        model.model.embed_tokens.weight[:, [5, 33]] *= 20  # outlier channels
    directory = tmp_path_factory.mktemp("tiny") / "model"
    model.to(torch.bfloat16).save_pretrained(directory, max_shard_size="60KB")
    assert (directory / "model.safetensors.index.json").is_file()
    float_model = LlamaForCausalLM.from_pretrained(directory).to(torch.float32).eval()
    ids = torch.randint(0, 128, (4, 2, 16), generator=generator)
    return directory, float_model, [{"input_ids": batch} for batch in ids]


def _with_kv_cache(config: dict) -> dict:
    config = copy.deepcopy(config)
    config["quant_cfg"]["*[kv]_bmm_quantizer"] = {"num_bits": (4, 3), "axis": None}
    return config


@pytest.mark.parametrize("name, config", [
    ("nvfp4_max", lowbit.get_preset("NVFP4_DEFAULT_CFG")),
    ("int4_awq_full_fp8_kv", _with_kv_cache({**_awq_int4(16), "algorithm": {"method": "awq_full",
                                                                           "alpha_step": 0.5}})),
    ("w4a8_awq_lite", {**lowbit.get_preset("W4A8_AWQ_BETA_CFG"), "algorithm": {"method": "awq_lite",
                                                                              "alpha_step": 0.5}}),
])
def test_tiny_sharded_model_same_as_whole_model(tiny, tmp_path, name, config):
    """NVFP4 max, a KV-cache quantizer before AWQ (the whole-model max pass first: two sweeps), and W4A8
    (its chained weight quantizers stay fake-quantized: dense weights and quantizer states written)."""
    directory, model, batches = tiny
    if name.startswith("w4a8"):
        config["quant_cfg"]["*weight_quantizer"][0]["block_sizes"] = {-1: 16, "type": "static"}
    reference = _whole_model_state(model, copy.deepcopy(config), batches)
    lowbit.quantize_layerwise(directory, config, batches, tmp_path / "out", dtype=torch.float32)
    _assert_same_state(load_file(tmp_path / "out" / "model.safetensors"), reference)
    loaded = lowbit.load_compressed(lambda: LlamaForCausalLM(model.config), tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.isfinite(loaded(**batches[0]).logits).all()


def test_activations_on_disk_beyond_the_budget(tiny, tmp_path):
    """A budget that holds the weights but not all the activations: they go to disk, the result is the same."""
    directory, model, batches = tiny
    config = _awq_int4(16)
    in_memory = lowbit.quantize_layerwise(directory, config, batches, tmp_path / "ram", dtype=torch.float32)
    # float32: embedding, head and final norm, then a block at its AWQ peak (lowbit.scale.memory's formula): its
    # weights (q, o; k, v half size; gate, up, down; 2 norms), float32 temporaries, the larger of one batch's
    # forward (32 tokens) and the sampled inputs of every linear (all 128 tokens: q, k, v, o, gate, up read 64
    # columns, down 128) plus one group's copy (128 columns) and its Gram matrix, and the run's overhead
    numel = 4 * 64 * 64 - 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64
    block = (4 * numel + int(TEMPORARIES["awq_lite"] * 4 * numel)
             + max(32 * (5 * 128 + 8 * 64) * 4, 128 * (6 * 64 + 128 + 128) * 4 + 128 * 128 * 4) + RUN_OVERHEAD)
    reserved = 4 * (128 * 64 * 2 + 64) + block + 3 * SKELETON_BYTES_PER_BLOCK
    activation_bytes = 2 * 16 * 64 * 4  # one batch's hidden states, float32
    on_disk = lowbit.quantize_layerwise(directory, config, batches, tmp_path / "disk", dtype=torch.float32,
                                        host_memory_budget=reserved + 3 * activation_bytes,
                                        offload_dir=tmp_path / "spill")
    assert in_memory.activation_bytes_on_disk == 0
    assert on_disk.activation_bytes_on_disk >= 4 * activation_bytes
    assert list((tmp_path / "spill").iterdir()) == []  # the spilled files are gone
    _assert_same_state(load_file(tmp_path / "disk" / "model.safetensors"),
                       load_file(tmp_path / "ram" / "model.safetensors"))
    with pytest.raises(ValueError, match=f"host_memory_budget={reserved - 1} bytes is below the {reserved}"):
        lowbit.quantize_layerwise(directory, config, batches, tmp_path / "small", host_memory_budget=reserved - 1,
                                  dtype=torch.float32)
    assert not (tmp_path / "small").exists()


def test_bad_arguments_fail_before_anything_is_written(tiny, tmp_path):
    directory, _, batches = tiny
    config = lowbit.get_preset("FP8_DEFAULT_CFG")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="smoothquant"):
        lowbit.quantize_layerwise(directory, lowbit.get_preset("INT8_SMOOTHQUANT_CFG"), batches, out)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        lowbit.quantize_layerwise(tmp_path / "missing", config, batches, out)
    with pytest.raises(ValueError, match="calib_data"):
        lowbit.quantize_layerwise(directory, config, [], out)
    with pytest.raises(ValueError, match="host_memory_budget=0"):
        lowbit.quantize_layerwise(directory, config, batches, out, host_memory_budget=0)
    with pytest.raises(ValueError, match="device='tpu9'"):
        lowbit.quantize_layerwise(directory, config, batches, out, device="tpu9")
    head = copy.deepcopy(config)
    head["quant_cfg"]["*lm_head.input_quantizer"] = {"num_bits": 8, "axis": None}
    with pytest.raises(ValueError, match=r"outside them: \['lm_head.input_quantizer'\]"):
        lowbit.quantize_layerwise(directory, head, batches, out)
    assert not out.exists()


def test_join_safetensors_keeps_every_tensor_aligned(tmp_path):
    generator = torch.Generator().manual_seed(3)
    first = {"codes": torch.randint(0, 255, (7,), dtype=torch.uint8, generator=generator),
             "scale": torch.randn(3, generator=generator)}
    second = {"weight": torch.randn(5, 3, generator=generator).to(torch.bfloat16),
              "amax": torch.randn((), generator=generator).abs().double()}
    save_file(first, tmp_path / "a.safetensors")
    save_file(second, tmp_path / "b.safetensors", metadata={"tied": "weight"})
    join_safetensors([("", tmp_path / "a.safetensors"), ("layers.1", tmp_path / "b.safetensors")],
                     tmp_path / "joined.safetensors")
    joined = load_file(tmp_path / "joined.safetensors")
    expected = {**first, **{f"layers.1.{k}": v for k, v in second.items()}}
    assert joined.keys() == expected.keys()
    assert all(torch.equal(joined[k], v) for k, v in expected.items())
    header_length = int.from_bytes((tmp_path / "joined.safetensors").read_bytes()[:8], "little")
    header = json.loads((tmp_path / "joined.safetensors").read_bytes()[8:8 + header_length])
    assert header["__metadata__"] == {"layers.1.tied": "layers.1.weight"}
    sizes = {"U8": 1, "F32": 4, "BF16": 2, "F64": 8}
    assert all(entry["data_offsets"][0] % sizes[entry["dtype"]] == 0
               for name, entry in header.items() if name != "__metadata__")
