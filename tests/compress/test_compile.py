"""Compressed models under ``torch.compile(fullgraph=True)``: no graph break in any format's forward.

The CPU kernels are aten ops (with torch's own fake implementations); the Triton kernels are ``lowbit::``
custom ops whose fake implementations are checked here without CUDA, under FakeTensorMode. ``aot_eager`` traces
the forward through fake tensors and runs the same ops, so the compiled output equals the eager one exactly.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import lowbit
from lowbit.compress import compress
from lowbit.kernels.scaled import Fp8Weight

PRESETS = ["INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "INT8_WEIGHT_ONLY_CFG", "W4A16_NVFP4_CFG", "FP8_DEFAULT_CFG",
           "INT8_DEFAULT_CFG", "MXFP4_DEFAULT_CFG"]


@pytest.mark.parametrize("preset", PRESETS)
def test_compressed_model_compiles_without_graph_breaks(preset):
    generator = torch.Generator().manual_seed(11)
    model = nn.Sequential(nn.Linear(256, 384), nn.GELU(), nn.Linear(384, 128, bias=False)).to(torch.bfloat16)
    x = torch.randn(2, 3, 256, generator=generator).to(torch.bfloat16)
    x[0, 0, 0] = 30.0
    model = compress(lowbit.quantize(model, copy.deepcopy(getattr(lowbit, preset)), lambda m: m(x)))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.inference_mode():
        assert torch.equal(compiled(x), model(x))


def test_compressed_hf_llama_compiles_through_lowbit_attention():
    """A quantized HF model routes attention through lowbit's ``"lowbit"`` implementation; under fullgraph its
    per-call path must not import (torch 2.11's dynamo breaks on importing transformers' lazy module)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(5)
    config = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=300)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    ids = torch.randint(0, 300, (1, 12))
    model = compress(lowbit.quantize(model, copy.deepcopy(lowbit.INT4_BLOCKWISE_WEIGHT_ONLY_CFG), lambda m: m(ids)))
    assert model.config._attn_implementation == "lowbit"
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.inference_mode():
        assert torch.equal(compiled(ids).logits, model(ids).logits)


def test_custom_op_fake_implementations_give_the_output_shape():
    with FakeTensorMode():
        x = torch.empty(5, 256, dtype=torch.bfloat16)
        codes = torch.empty(384, 128, dtype=torch.uint8)
        scale = torch.empty(384, 2, dtype=torch.float32)
        out = torch.ops.lowbit.w4_linear(x, codes, scale, None, None, None, "int_divide", 128, 8)
        assert out.shape == (5, 384) and out.dtype == torch.bfloat16
        weight = Fp8Weight(torch.empty(384, 256, dtype=torch.float8_e4m3fn), torch.empty(()), torch.empty(1, 384))
        out = torch.ops.lowbit.fp8_linear(x, weight.codes, weight.inverse_scale, weight.inverse_scale_row, None,
                                          None, torch.float16)
        assert out.shape == (5, 384) and out.dtype == torch.float16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("preset", ["INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "W4A16_NVFP4_CFG", "FP8_DEFAULT_CFG"])
def test_compressed_model_compiles_with_inductor_on_cuda(preset):
    """Inductor and CUDA graphs (mode reduce-overhead, as HF's static cache compiles) around the lowbit:: ops:
    the compiled output equals the eager one to the output's rounding (Inductor may fuse the bias and GELU)."""
    generator = torch.Generator(device="cuda").manual_seed(11)
    model = nn.Sequential(nn.Linear(512, 1024), nn.GELU(), nn.Linear(1024, 256, bias=False)).to("cuda", torch.bfloat16)
    x = torch.randn(1, 512, generator=generator, device="cuda").to(torch.bfloat16)
    model = compress(lowbit.quantize(model, copy.deepcopy(getattr(lowbit, preset)), lambda m: m(x)))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, mode="reduce-overhead")
    with torch.inference_mode():
        expected = model(x).double()
        for _ in range(3):  # warm-up, capture, replay
            out = compiled(x).double()
    assert ((out - expected).norm() / expected.norm()).item() <= 1e-2
