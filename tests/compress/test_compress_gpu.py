"""Compressed models on CUDA: Triton / cuBLAS / _scaled_mm paths against the fake-quant model, and the
GPU memory of a LowbitConfig load against a bf16 load (each in a fresh process, bench/memory.py)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from lowbit.compress.convert import compress
from lowbit.compress.linear import CompressedLinear

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
BENCH = Path(__file__).resolve().parents[2] / "bench" / "memory.py"


def _model() -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.GELU(), nn.Linear(1024, 256))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model.to("cuda", torch.bfloat16)


@pytest.mark.parametrize("preset", ["INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "W4A16_NVFP4_CFG", "FP8_DEFAULT_CFG",
                                    "INT8_DEFAULT_CFG", "FP8_PER_CHANNEL_PER_TOKEN_CFG", "MXFP4_DEFAULT_CFG"])
@pytest.mark.parametrize("rows", [1, 12, 300])
def test_compressed_matches_fake_quant_on_cuda(preset, rows):
    generator = torch.Generator(device="cuda").manual_seed(1)
    batches = [torch.randn(8, 512, generator=generator, device="cuda").to(torch.bfloat16) for _ in range(2)]
    model = lowbit.quantize(_model(), copy.deepcopy(getattr(lowbit, preset)), lambda m: [m(b) for b in batches])
    x = torch.randn(rows, 512, generator=generator, device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        expected = model(x).double()
        first = model[0]
        weight = first.weight_quantizer(first.weight)
    compressed = compress(model)
    assert isinstance(compressed[0], CompressedLinear)
    assert torch.equal(compressed[0].dequantized_weight(torch.bfloat16), weight)
    with torch.no_grad():
        out = compressed(x).double()
    # bf16 outputs of two layers, W8A8 activations rounded to bf16 only on the fake-quant side
    assert ((out - expected).norm() / expected.norm()).item() < 2e-2


def test_training_step_through_triton_kernels():
    model = compress(lowbit.quantize(_model(), copy.deepcopy(lowbit.INT4_BLOCKWISE_WEIGHT_ONLY_CFG)))
    model[0].add_lora(rank=8, generator=torch.Generator(device="cuda").manual_seed(2))
    x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    model(x).float().square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert model[0].lora_b.grad is not None and model[0].bias.grad is not None


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "W4A16_NVFP4_CFG"])
def test_gpu_peak_memory_of_init_quantized_weights(tmp_path, preset):
    """torch.cuda.max_memory_allocated of a device_map="cuda" load: packed (from_pretrained with LowbitConfig:
    transformers' allocator warmup reserves the packed bytes, one dense weight at a time) <= 0.4x of the bf16 load,
    each in a fresh process (bench/memory.py)."""
    pytest.importorskip("accelerate", reason="transformers' device_map needs accelerate")
    def probe(*args: str) -> dict:
        out = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    probe("--save", str(tmp_path), "--hidden", "1024", "--layers", "8", "--intermediate", "4096", "--vocab", "2048")
    dense = probe("--probe", str(tmp_path), "--device", "cuda")["peak_gpu"]
    packed = probe("--probe", str(tmp_path), "--device", "cuda", "--preset", preset)["peak_gpu"]
    print(f"GPU peak: bf16 load {dense} B, LowbitConfig {preset} {packed} B ({packed / dense:.3f}x)")
    assert packed <= 0.4 * dense
