"""TensorRT-LLM legacy checkpoint: per-rank files reassemble to the unsplit export exactly (TP 1/2/4 x PP 1/2),
the stored codes are lowbit's, and bad requests fail before anything is written."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import lowbit
from lowbit.export.trtllm import export_tensorrt_llm_checkpoint

HEADS, KV_HEADS, HEAD_DIM, LAYERS, VOCAB = 8, 4, 8, 2, 130  # vocab 130: not a multiple of 4, so it is padded


def tiny_llama():
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HEADS * HEAD_DIM, intermediate_size=128,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         max_position_embeddings=32)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.copy_(("norm" in name) + 0.08 * torch.randn(parameter.shape, generator=generator))
        model.model.layers[0].mlp.down_proj.weight[:, 5] *= 30  # an outlier input channel
    return model


def int4_blocks(size):
    cfg = copy.deepcopy(lowbit.INT4_BLOCKWISE_WEIGHT_ONLY_CFG)
    cfg["quant_cfg"]["*weight_quantizer"]["block_sizes"] = {-1: size}
    return cfg


CONFIGS = {
    "float": None,
    "fp8": lowbit.FP8_DEFAULT_CFG,
    "int8_sq": lowbit.INT8_SMOOTHQUANT_CFG,
    "w8a16": lowbit.INT8_WEIGHT_ONLY_CFG,
    "w4a16": int4_blocks(8),
}


@pytest.fixture(scope="module")
def quantized_models():
    model = tiny_llama()
    batches = [torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]

    def forward_loop(m):
        for batch in batches:
            m(batch)

    out = {}
    for name, cfg in CONFIGS.items():
        out[name] = model if cfg is None else lowbit.quantize(copy.deepcopy(model), copy.deepcopy(cfg), forward_loop)
    return out


def _read(directory, world):
    return json.loads((directory / "config.json").read_text()), [load_file(directory / f"rank{r}.safetensors")
                                                                  for r in range(world)]


def _qkv_rows(name, tensor, tp):
    """Rows of q, k, v in one rank's fused qkv tensor (packed INT4 weights hold two rows per row)."""
    packed = name.endswith("qkv.weight") and tensor.dtype == torch.int8 and tensor.shape[1] == HEADS * HEAD_DIM \
        and tensor.shape[0] * 2 * tp == (HEADS + 2 * KV_HEADS) * HEAD_DIM
    per_row = 2 if packed else 1
    return [HEADS * HEAD_DIM // tp // per_row, KV_HEADS * HEAD_DIM // tp // per_row,
            KV_HEADS * HEAD_DIM // tp // per_row]


def reassemble(ranks, tp, pp):
    """The unsplit checkpoint from per-rank tensors, by the inverse of the documented split (written here)."""
    per_stage = LAYERS // pp
    grouped = {}
    for rank, tensors in enumerate(ranks):
        pp_rank, tp_rank = divmod(rank, tp)
        for name, tensor in tensors.items():
            if name.startswith("transformer.layers."):
                _, _, local, rest = name.split(".", 3)
                name = f"transformer.layers.{int(local) + pp_rank * per_stage}.{rest}"
            grouped.setdefault(name, {})[tp_rank] = tensor
    out = {}
    for name, by_rank in grouped.items():
        shards = [by_rank[r] for r in range(tp)]
        first = shards[0]
        if name.endswith("qkv.weight") or (name.endswith("qkv.weights_scaling_factor") and first.dim() > 0):
            sizes = _qkv_rows(name, first, tp)
            pieces = [s.split(sizes) for s in shards]
            out[name] = torch.cat([torch.cat([p[i] for p in pieces]) for i in range(3)])
        elif name.endswith((".dense.weight", ".proj.weight")) or (
                name.endswith((".dense.weights_scaling_factor", ".proj.weights_scaling_factor")) and first.dim() == 2):
            out[name] = torch.cat(shards, dim=1)
        elif name.endswith((".dense.prequant_scaling_factor", ".proj.prequant_scaling_factor")):
            out[name] = torch.cat(shards)
        elif name.endswith((".fc.weight", ".gate.weight")) or (
                name.endswith((".fc.weights_scaling_factor", ".gate.weights_scaling_factor")) and first.dim() > 0):
            out[name] = torch.cat(shards)
        elif name in ("transformer.vocab_embedding.weight", "lm_head.weight"):
            out[name] = torch.cat(shards)[:VOCAB]
        else:
            for shard in shards[1:]:
                assert torch.equal(shard, first), f"{name} must be replicated"
            out[name] = first
    return out


def _equal(a, b):
    if a.dtype == torch.float8_e4m3fn:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:.*re-quantized to FP8")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_ranks_reassemble_to_the_unsplit_export(quantized_models, tmp_path, name):
    model = quantized_models[name]
    _, (full,) = _read(export_tensorrt_llm_checkpoint(model, "llama", torch.float16, tmp_path / "full"), 1)
    for tp in (1, 2, 4):
        for pp in (1, 2):
            directory = export_tensorrt_llm_checkpoint(model, "llama", "float16", tmp_path / f"tp{tp}pp{pp}", tp, pp)
            config, ranks = _read(directory, tp * pp)
            assert config["mapping"] == {"world_size": tp * pp, "tp_size": tp, "pp_size": pp}
            assert config["num_hidden_layers"] == LAYERS and config["vocab_size"] == VOCAB
            for rank in ranks[tp:]:  # only the first stage holds the embedding, only the last ln_f / lm_head
                assert "transformer.vocab_embedding.weight" not in rank
            for rank in ranks[: tp * (pp - 1)]:
                assert "lm_head.weight" not in rank and "transformer.ln_f.weight" not in rank
            assembled = reassemble(ranks, tp, pp)
            assert sorted(assembled) == sorted(full), (tp, pp)
            for key, tensor in full.items():
                assert _equal(assembled[key], tensor), (name, tp, pp, key)


def test_quantization_fields_and_codes(quantized_models, tmp_path):
    expected = {"fp8": "FP8", "int8_sq": "W8A8_SQ_PER_CHANNEL", "w8a16": "W8A16", "w4a16": "W4A16_AWQ"}
    for name, algo in expected.items():
        model = quantized_models[name]
        if algo == "FP8":
            with pytest.warns(UserWarning, match=r"self_attn: q, k and v weights re-quantized"):
                directory = export_tensorrt_llm_checkpoint(model, "llama", torch.float16, tmp_path / name)
        else:
            directory = export_tensorrt_llm_checkpoint(model, "llama", torch.float16, tmp_path / name)
        config, (tensors,) = _read(directory, 1)
        assert config["quantization"]["quant_algo"] == algo
        assert config["quantization"]["exclude_modules"] == ["lm_head"]
        down = model.model.layers[0].mlp.down_proj  # row layer with the outlier channel; not re-quantized
        reference = down.weight_quantizer(down.weight.detach()).double()
        weight = tensors["transformer.layers.0.mlp.proj.weight"]
        scale = tensors["transformer.layers.0.mlp.proj.weights_scaling_factor"].double()
        if algo == "W4A16_AWQ":
            assert config["quantization"]["group_size"] == 8
            raw = weight.view(torch.uint8).to(torch.int16)
            low, high = raw & 15, raw >> 4
            signed = lambda v: torch.where(v > 7, v - 16, v).double()  # noqa: E731
            codes = torch.stack([signed(low), signed(high)], dim=1).reshape(-1, weight.shape[1])
            values = codes * scale.repeat_interleave(8, dim=1)
            tolerance = 2.0**-11 * reference.abs().max()  # the float16 scale's rounding
        else:
            values = weight.double() * (scale if scale.dim() == 0 else scale[:, None])
            tolerance = 1e-6 * reference.abs().max()  # float32 step instead of lowbit's division
        assert (values - reference).abs().max() <= tolerance, algo
        if algo in ("FP8", "W8A8_SQ_PER_CHANNEL"):
            amax = down.input_quantizer.amax.double()
            bound = 448.0 if algo == "FP8" else 127.0
            assert torch.allclose(tensors["transformer.layers.0.mlp.proj.activation_scaling_factor"].double(),
                                  amax / bound, rtol=1e-6)


def test_bad_requests_write_nothing(quantized_models, tmp_path):
    model = quantized_models["w8a16"]
    target = tmp_path / "out"
    with pytest.raises(ValueError, match="decoder_type='gpt'"):
        export_tensorrt_llm_checkpoint(model, "gpt", torch.float16, target)
    with pytest.raises(ValueError, match="inference_tensor_parallel=3"):
        export_tensorrt_llm_checkpoint(model, "llama", torch.float16, target, 3)
    with pytest.raises(ValueError, match="inference_pipeline_parallel=4"):
        export_tensorrt_llm_checkpoint(model, "llama", torch.float16, target, 1, 4)
    with pytest.raises(ValueError, match="dtype="):
        export_tensorrt_llm_checkpoint(model, "llama", torch.int8, target)
    nvfp4 = lowbit.quantize(tiny_llama(), copy.deepcopy(lowbit.W4A16_NVFP4_CFG))
    with pytest.raises(ValueError, match=r"layer 'model\.layers\.0\.self_attn\.q_proj'.*nvfp4"):
        export_tensorrt_llm_checkpoint(nvfp4, "llama", torch.float16, target)
    assert not target.exists()
    target.mkdir()
    (target / "mine.txt").write_text("not lowbit's")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_tensorrt_llm_checkpoint(model, "llama", torch.float16, target)
    assert [p.name for p in target.iterdir()] == ["mine.txt"]


def test_registry_dispatches_the_three_targets(quantized_models, tmp_path):
    from lowbit.export import export, export_formats, get_exporter

    assert {"gguf", "onnx", "trtllm"} <= set(export_formats())
    assert get_exporter("gguf").__name__ == "export_gguf"
    assert get_exporter("onnx").__name__ == "export_onnx_dir"
    directory = export(quantized_models["w8a16"], tmp_path / "trt", "trtllm", inference_tensor_parallel=2)
    assert sorted(p.name for p in directory.glob("rank*.safetensors")) == ["rank0.safetensors", "rank1.safetensors"]
