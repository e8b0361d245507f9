"""ONNX Q/DQ exports run by onnxruntime (CPU): outputs within 1e-2 relative of the fake-quantized model for
every format, INT8 W8A8 and FP8 included, with either ``numerics``; with "lowbit" (the graph is lowbit's math)
within 1e-5 (measured 0 on the MLPs, <= 4.4e-7 on the CNNs, where only onnxruntime's float kernels differ);
with "onnx" (steps for scales) measured up to 3.2e-3 (CNN INT8: a flipped activation code). The graph holds
QuantizeLinear / DequantizeLinear with int8 / int4 / FP8 initializers, and the file is written atomically.

Deeper static-W8A8 models are another matter: one activation code flipped by a float kernel's rounding
spreads; bench/export_onnx_layers.py measures it on the bundled Llama, where lowbit's own float32 logits are
0.4-3 % from the same model computed in float64."""

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lowbit

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytestmark = pytest.mark.consumer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))
from test_onnx_qdq import CNN, MLP, quantized, sample  # noqa: E402

INITIALIZER_TYPES = {"int8_w8a8": onnx.TensorProto.INT8, "int8_pre_quant_scale": onnx.TensorProto.INT8,
                     "fp8": onnx.TensorProto.FLOAT8E4M3FN, "int4_blocks": onnx.TensorProto.INT4,
                     "int4_asym_blocks": onnx.TensorProto.UINT4}
W8A8 = ("int8_w8a8", "fp8")
CASES = [(MLP, (8, 64), name, "lowbit") for name in INITIALIZER_TYPES] + \
    [(CNN, (2, 3, 16, 16), name, "lowbit") for name in W8A8] + \
    [(model_cls, shape, name, "onnx") for model_cls, shape in ((MLP, (8, 64)), (CNN, (2, 3, 16, 16))) for name in W8A8]
STRICT = 1e-2  # the bar, for every format
EXACT_GRAPH = 1e-5  # numerics="lowbit" on the MLP / CNN: float-kernel rounding only


def run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("model_cls,shape,cfg_name,numerics", CASES)
def test_onnxruntime_runs_the_export(model_cls, shape, cfg_name, numerics, tmp_path):
    from lowbit.export.onnx_qdq import export_onnx

    x = sample(shape, 1)
    model = quantized(model_cls, cfg_name, x)
    path = export_onnx(model, x, tmp_path / "model.onnx", numerics=numerics)
    graph = onnx.load(str(path)).graph
    ops = [node.op_type for node in graph.node]
    assert "DequantizeLinear" in ops and ("QuantizeLinear" in ops) == (not cfg_name.startswith("int4"))
    assert ("Div" in ops) == (numerics == "lowbit" and cfg_name != "int4_asym_blocks")  # lowbit's codes / scale
    codes = [t for t in graph.initializer if t.name.endswith("weight_codes")]
    assert codes and all(t.data_type == INITIALIZER_TYPES[cfg_name] for t in codes)
    fresh = sample(shape, 7)  # not the traced input
    with torch.no_grad():
        reference = model(fresh).double().numpy()
    result = run(path, fresh).astype(np.float64)
    bound = EXACT_GRAPH if numerics == "lowbit" else STRICT
    assert np.linalg.norm(result - reference) <= bound * np.linalg.norm(reference)


@pytest.mark.parametrize("numerics", ["lowbit", "onnx"])
@pytest.mark.parametrize("cfg_name", ["INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG"])
def test_tiny_llama_w8a8(cfg_name, numerics, tmp_path):
    """A 2-layer Llama (seeded weights) with static INT8 / FP8 inputs on every linear: attention, RMSNorm and
    SiLU run in onnxruntime's own float kernels between the quantized layers (measured on 3 inputs: 2.6e-7 ..
    2.9e-7, and 5.0e-4 once for INT8 "lowbit", where a float kernel's rounding flipped an activation code)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.export.onnx_qdq import export_onnx

    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    calibration = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    model = lowbit.quantize(model, copy.deepcopy(getattr(lowbit, cfg_name)), lambda m: m(calibration))
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    path = export_onnx(model, {"input_ids": ids}, tmp_path / "llama.onnx", numerics=numerics)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    result = session.run(None, {"input_ids": ids.numpy()})[0].astype(np.float64)
    with torch.no_grad():
        reference = model(ids).logits.double().numpy()
    assert np.linalg.norm(result - reference) <= STRICT * np.linalg.norm(reference)


def test_bundled_model_int4_blocks(tmp_path):
    from lowbit.export.onnx_qdq import export_onnx

    model, tokenizer = lowbit.assets.load_default_model()
    model.config.use_cache = False
    quantized_model = lowbit.quantize(copy.deepcopy(model), copy.deepcopy(lowbit.INT4_BLOCKWISE_WEIGHT_ONLY_CFG))
    ids = tokenizer(lowbit.assets.bundled_text("heldout")[:400], return_tensors="pt").input_ids[:, :48]
    path = export_onnx(quantized_model, {"input_ids": ids}, tmp_path / "llama.onnx")
    with torch.no_grad():
        reference = quantized_model(ids).logits.double().numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    result = session.run(None, {"input_ids": ids.numpy()})[0].astype(np.float64)
    assert np.linalg.norm(result - reference) <= 1e-2 * np.linalg.norm(reference)


def test_existing_file_is_kept_unless_overwrite(tmp_path):
    from lowbit.export.onnx_qdq import export_onnx

    x = sample((8, 64), 1)
    model = quantized(MLP, "int8_w8a8", x)
    target = tmp_path / "model.onnx"
    target.write_bytes(b"someone else's")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_onnx(model, x, target)
    assert target.read_bytes() == b"someone else's"
    export_onnx(model, x, target, overwrite=True)
    assert np.linalg.norm(run(target, x) - model(x).detach().numpy()) <= 1e-2 * np.linalg.norm(model(x).detach())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temporary file left


def test_registry_onnx_target_traces_from_the_tokenizer(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.export import export

    _, tokenizer = lowbit.assets.load_default_model()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    quantized_model = lowbit.quantize(model, copy.deepcopy(lowbit.INT4_BLOCKWISE_WEIGHT_ONLY_CFG))
    path = export(quantized_model, tmp_path / "onnx", "onnx", tokenizer=tokenizer)
    assert path.name == "model.onnx" and (path.parent / "tokenizer.json").is_file()
    ids = tokenizer(["An unrelated sentence, longer than the traced one."] * 2, return_tensors="pt").input_ids
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    result = session.run(None, {"input_ids": ids.numpy()})[0].astype(np.float64)
    with torch.no_grad():
        reference = quantized_model(ids).logits.double().numpy()
    assert np.linalg.norm(result - reference) <= 1e-2 * np.linalg.norm(reference)
