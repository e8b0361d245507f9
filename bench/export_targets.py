"""GGUF, ONNX Q/DQ and TensorRT-LLM exports of the bundled model, checked against their consumers.

Protocol (fixed: bundled Llama, seed-free inputs from the bundled texts, float32, CPU):
- calibration: the first 256 tokens of the calibration text; evaluation: the first 128 held-out tokens;
- GGUF (needs gguf, accelerate): weight-only configs -> export_gguf; max over quantized layers of
  |gguf dequantize - lowbit fake-quant weight| / max |fake-quant weight| (q/k rows un-permuted), and
  transformers' from_pretrained(gguf_file=...) logits against lowbit's model (relative L2) and top-1 agreement;
- GGUF Q4_K / Q6_K: INT4 g32 / INT6 g16 after ``snap_k_quant_scales``; "snap moved logits" is how far the
  k-quant grid of scales moves lowbit's own model (relative L2 of its logits before / after snapping);
- ONNX (needs onnx, onnxruntime, onnxscript): onnxruntime CPU logits against lowbit's model (relative L2), split
  into the export's math run in torch (``export_copy``: ONNX's ``x / step`` and ``codes * step`` where lowbit
  computes ``x * scale`` and ``codes / scale``) against lowbit, and onnxruntime against that torch run;
- TensorRT-LLM: export time and rank file sizes for TP x PP in {1, 2} x {1, 2} (TP 4 is refused: 2 KV heads).
Prints one table per target (markdown); the results file cites them.

    python bench/export_targets.py
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import lowbit
from lowbit.export import export_gguf, export_onnx, export_tensorrt_llm_checkpoint, snap_k_quant_scales
from lowbit.export.onnx_qdq import export_copy


def weight_only(weight_cfg: dict) -> dict:
    return {"quant_cfg": {"*weight_quantizer": weight_cfg, "*input_quantizer": {"enable": False},
                          "*lm_head*": {"enable": False}, "default": {"enable": False}}, "algorithm": "max"}


GGUF_CASES = (  # (GGUF type, config name, config, snap onto the k-quant grid)
    ("Q8_0", "INT8_WEIGHT_ONLY_CFG", lowbit.INT8_WEIGHT_ONLY_CFG, False),
    ("Q4_0", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", lowbit.INT4_BLOCKWISE_WEIGHT_ONLY_CFG, False),
    ("Q4_1", "INT4 asymmetric g32", weight_only({"num_bits": 4, "asymmetric": True, "block_sizes": {-1: 32}}), False),
    ("Q4_K", "INT4 g32 + snap_k_quant_scales", weight_only({"num_bits": 4, "block_sizes": {-1: 32}}), True),
    ("Q6_K", "INT6 g16 + snap_k_quant_scales", weight_only({"num_bits": 6, "block_sizes": {-1: 16}}), True),
)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).norm() / b.norm()).item()


def gguf_weight_error(model, path) -> float:
    import gguf

    config = model.config
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    worst = 0.0
    for index, layer in enumerate(model.model.layers):
        for hf, name in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                         ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"),
                         ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down")):
            module = layer.get_submodule(hf)
            tensor = tensors[f"blk.{index}.{name}.weight"]
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float64)
            heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}.get(name)
            if heads:  # undo llama.cpp's interleaving: rows (h, i, pair) -> (h, pair, i)
                values = values.reshape(heads, -1, 2, values.shape[1]).transpose(0, 2, 1, 3).reshape(values.shape)
            fake = module.weight_quantizer(module.weight.detach()).double().numpy()
            worst = max(worst, np.abs(values - fake).max() / np.abs(fake).max())
    return worst


def bench_gguf(model, tokenizer, ids, folder: Path) -> None:
    from transformers import AutoModelForCausalLM

    print("\n| GGUF | config | export s | file MB | max weight err / max | logits rel. L2 | top-1 agree | "
          "snap moved logits |")
    print("|---|---|---|---|---|---|---|---|")
    for type_name, name, cfg, snap in GGUF_CASES:
        quantized = lowbit.quantize(copy.deepcopy(model), copy.deepcopy(cfg))
        moved = "-"
        if snap:
            with torch.no_grad():
                free = quantized(ids).logits
            snap_k_quant_scales(quantized)
            with torch.no_grad():
                moved = f"{relative(quantized(ids).logits, free):.2e}"
        start = time.perf_counter()
        path = export_gguf(quantized, folder / type_name, tokenizer=tokenizer)
        seconds = time.perf_counter() - start
        reloaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        with torch.no_grad():
            reference, logits = quantized(ids).logits, reloaded(ids).logits
        agree = (reference.argmax(-1) == logits.argmax(-1)).float().mean().item()
        print(f"| {type_name} | {name} | {seconds:.1f} | {path.stat().st_size / 2**20:.2f} | "
              f"{gguf_weight_error(quantized, path):.2e} | {relative(logits, reference):.2e} | {agree:.4f} | "
              f"{moved} |")


def bench_onnx(model, ids, calibration, folder: Path) -> None:
    import onnxruntime as ort

    model.config.use_cache = False
    with torch.no_grad():
        float_logits = model(ids).logits
    print("\n| ONNX config | export s | file MB | ORT vs lowbit rel. L2 | ONNX math in torch vs lowbit | "
          "ORT vs ONNX math in torch | ORT vs float | lowbit vs float |")
    print("|---|---|---|---|---|---|---|---|")
    for name, cfg in (("INT8_DEFAULT_CFG (W8A8)", lowbit.INT8_DEFAULT_CFG),
                      ("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", lowbit.INT4_BLOCKWISE_WEIGHT_ONLY_CFG),
                      ("FP8_DEFAULT_CFG", lowbit.FP8_DEFAULT_CFG)):
        quantized = lowbit.quantize(copy.deepcopy(model), copy.deepcopy(cfg), lambda m: m(calibration))
        start = time.perf_counter()
        path = export_onnx(quantized, {"input_ids": ids}, folder / f"{name.split()[0]}.onnx")
        seconds = time.perf_counter() - start
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        result = torch.from_numpy(session.run(None, {"input_ids": ids.numpy()})[0])
        with torch.no_grad():
            reference, emulated = quantized(ids).logits, export_copy(quantized)[0](ids).logits
        print(f"| {name} | {seconds:.1f} | {path.stat().st_size / 2**20:.2f} | {relative(result, reference):.2e} | "
              f"{relative(emulated, reference):.2e} | {relative(result, emulated):.2e} | "
              f"{relative(result, float_logits):.2e} | {relative(reference, float_logits):.2e} |")


def bench_trtllm(model, calibration, folder: Path) -> None:
    print("\n| TensorRT-LLM quant_algo | lowbit config | TP | PP | export s | rank files MB |")
    print("|---|---|---|---|---|---|")
    for name, cfg_name in (("W8A16", "INT8_WEIGHT_ONLY_CFG"), ("FP8", "FP8_DEFAULT_CFG"),
                           ("W4A16_AWQ", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG")):
        cfg = getattr(lowbit, cfg_name)
        quantized = lowbit.quantize(copy.deepcopy(model), copy.deepcopy(cfg), lambda m: m(calibration))
        for tp in (1, 2):
            for pp in (1, 2):
                start = time.perf_counter()
                directory = export_tensorrt_llm_checkpoint(quantized, "llama", torch.float16,
                                                           folder / f"{name}_{tp}_{pp}", tp, pp)
                seconds = time.perf_counter() - start
                files = sorted(directory.glob("rank*.safetensors"))
                sizes = " / ".join(f"{p.stat().st_size / 2**20:.2f}" for p in files)
                print(f"| {name} | {cfg_name} | {tp} | {pp} | {seconds:.2f} | {sizes} |")


def main() -> None:
    torch.set_num_threads(1)
    model, tokenizer = lowbit.assets.load_default_model()
    calibration = tokenizer(lowbit.assets.bundled_text("calibration")[:4000], return_tensors="pt").input_ids[:, :256]
    ids = tokenizer(lowbit.assets.bundled_text("heldout")[:1200], return_tensors="pt").input_ids[:, :128]
    print(f"torch {torch.__version__}, lowbit {lowbit.__version__}, tokens: calibration 256, evaluation 128")
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        bench_trtllm(model, calibration, folder)
        bench_gguf(model, tokenizer, ids, folder)
        bench_onnx(model, ids, calibration, folder)


if __name__ == "__main__":
    main()
