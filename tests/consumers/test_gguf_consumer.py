"""GGUF read back by its consumers: gguf's reader (dequantize == the file's blocks == lowbit's codes times
float16 steps; for Q4_K / Q6_K after ``snap_k_quant_scales``, lowbit's fake-quantized weights up to float32
rounding) and transformers (``from_pretrained(dir, gguf_file=...)`` dequantizes and undoes the q/k
permutation: logits within 1e-2 relative of lowbit's model, the tokenizer rebuilt from the file)."""

import copy

import numpy as np
import pytest
import torch

import lowbit

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")  # transformers needs it to load a GGUF file
pytestmark = pytest.mark.consumer

def weight_only(weight_cfg):
    return {"quant_cfg": {"*weight_quantizer": weight_cfg, "*input_quantizer": {"enable": False},
                          "*lm_head*": {"enable": False}, "default": {"enable": False}}, "algorithm": "max"}


CONFIGS = {  # weight-only: GGUF holds no activation quantization
    "Q8_0": lowbit.INT8_WEIGHT_ONLY_CFG,
    "Q4_0": lowbit.INT4_BLOCKWISE_WEIGHT_ONLY_CFG,
    "Q4_1": weight_only({"num_bits": 4, "asymmetric": True, "block_sizes": {-1: 32}}),
    "Q4_K": weight_only({"num_bits": 4, "block_sizes": {-1: 32}}),  # then snapped onto the k-quant grid
    "Q6_K": weight_only({"num_bits": 6, "block_sizes": {-1: 16}}),
}
TOLERANCES = {"Q4_1": 2.0**-10, "Q4_K": 2.0**-22, "Q6_K": 2.0**-22}  # else 2**-11: float16 d; k-quants: 2 ulp


@pytest.fixture(scope="module")
def bundled():
    return lowbit.assets.load_default_model()


@pytest.fixture(scope="module", params=list(CONFIGS))
def exported(request, bundled, tmp_path_factory):
    from lowbit.export import snap_k_quant_scales
    from lowbit.export.gguf import export_gguf

    model, tokenizer = bundled
    quantized = lowbit.quantize(copy.deepcopy(model), copy.deepcopy(CONFIGS[request.param]))
    if request.param.endswith("_K"):
        assert len(snap_k_quant_scales(quantized)) == 7 * model.config.num_hidden_layers
    path = export_gguf(quantized, tmp_path_factory.mktemp(request.param), tokenizer=tokenizer)
    return request.param, quantized, path


def test_reader_dequantizes_lowbit_weights(exported, bundled):
    type_name, model, path = exported
    config = model.config
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    layer = model.model.layers[3].mlp.down_proj
    tensor = tensors["blk.3.ffn_down.weight"]
    assert tensor.tensor_type.name == type_name
    from_file = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float64)
    fake = layer.weight_quantizer(layer.weight.detach()).double().numpy()
    relative = TOLERANCES.get(type_name, 2.0**-11)  # the float16 rounding of d (and m); k-quants: float32's
    assert np.abs(from_file - fake).max() <= relative * np.abs(fake).max()
    q = tensors["blk.3.attn_q.weight"]  # stored permuted: undo it by the definition (rows 2i, 2i+1 -> i, i + d/2)
    values = gguf.quants.dequantize(q.data, q.tensor_type).astype(np.float64)
    heads, head_dim = config.num_attention_heads, config.head_dim
    halves = values.reshape(heads, head_dim // 2, 2, -1).transpose(0, 2, 1, 3).reshape(values.shape)
    attention = model.model.layers[3].self_attn.q_proj
    fake_q = attention.weight_quantizer(attention.weight.detach()).double().numpy()
    assert np.abs(halves - fake_q).max() <= relative * np.abs(fake_q).max()
    norm = tensors["blk.3.attn_norm.weight"]
    assert np.array_equal(norm.data, model.model.layers[3].input_layernorm.weight.detach().numpy())


def test_transformers_reloads_logits_and_tokenizer(exported, bundled):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    type_name, model, path = exported
    _, tokenizer = bundled
    text = lowbit.assets.bundled_text("heldout")[:600]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :128]
    reloaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        reference, logits = model(ids).logits.double(), reloaded(ids).logits.double()
    assert (logits - reference).norm() <= 1e-2 * reference.norm(), type_name
    reloaded_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert reloaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_existing_foreign_directory_is_refused(bundled, tmp_path):
    from lowbit.export.gguf import export_gguf

    model, tokenizer = bundled
    quantized = lowbit.quantize(copy.deepcopy(model), copy.deepcopy(CONFIGS["Q8_0"]))
    (tmp_path / "notes.txt").write_text("someone else's")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_gguf(quantized, tmp_path, tokenizer=tokenizer)
    assert export_gguf(quantized, tmp_path, tokenizer=tokenizer, overwrite=True).is_file()
    assert not (tmp_path / "notes.txt").exists()
