"""transformers (with compressed-tensors installed) reloads lowbit's compressed-tensors exports.

Every export format is reloaded with ``AutoModelForCausalLM.from_pretrained`` and its logits compared with
lowbit's quantized model (float32): within 1e-2 relative (Frobenius norm over the batch). NVFP4 reloads in
bfloat16, because compressed-tensors decompresses NVFP4 weights to bfloat16 whatever the model dtype.
NVFP4 W4A4 does not hold and is an expected failure: 15% off lowbit's W4A4 model with transformers 5.19 +
compressed-tensors 0.17 and 15-18% with 5.25 + 0.20. Cause (``bench/export_nvfp4_reload.py``, results in
bench/results/export_2026-12-07.md): compressed-tensors decompresses NVFP4 weights to bfloat16 (q_proj 0.14%
relative), and W4A4's E2M1 activation rounding amplifies that: lowbit's own W4A4 model with its dequantized weights
rounded to bfloat16 moves 8.0% (W4A16: 0.30%), run in bfloat16 17%; the reload's activation quantization equals
lowbit's to 7.6e-8 given the same input.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.export import export_compressed_tensors

from .tiny import preset, quantized, tiny_llama, token_batches

pytest.importorskip("compressed_tensors")
pytestmark = pytest.mark.consumer
RTOL = 1e-2
BLOCK_FP8 = {"*weight_quantizer": {"num_bits": (4, 3), "block_sizes": {-1: 128, -2: 128}},
             "*input_quantizer": {"enable": False}}
NORM_FED_W8A8 = {"*o_proj*": {"enable": False}, "*down_proj*": {"enable": False}}  # see bench/export_vllm.py
CASES = {  # name: (config, dtype)
    "FP8 tensor, static activations": (lambda: preset("FP8_DEFAULT_CFG"), torch.float32),
    "FP8 channel, per-token activations": (lambda: preset("FP8_PER_CHANNEL_PER_TOKEN_CFG"), torch.float32),
    "FP8 128x128 blocks": (lambda: preset("FP8_DEFAULT_CFG", **BLOCK_FP8), torch.float32),
    "W4A16 g128": (lambda: preset("INT4_BLOCKWISE_WEIGHT_ONLY_CFG"), torch.float32),
    "W8A16 channel": (lambda: preset("INT8_WEIGHT_ONLY_CFG"), torch.float32),
    "W8A8 INT8 SmoothQuant": (lambda: preset("INT8_SMOOTHQUANT_CFG", **NORM_FED_W8A8), torch.float32),
    "NVFP4": (lambda: preset("NVFP4_DEFAULT_CFG"), torch.bfloat16),
    "W4A16 NVFP4": (lambda: preset("W4A16_NVFP4_CFG"), torch.bfloat16),
}


NAMES = [pytest.param(name, marks=pytest.mark.xfail(strict=True,
    reason="NVFP4 W4A4: 15-18% off: bfloat16-decompressed weights, amplified by FP4 activations (measured)"))
         if name == "NVFP4" else name for name in sorted(CASES)]


@pytest.mark.parametrize("name", NAMES)
def test_transformers_reloads_the_export(tmp_path, name):
    from transformers import AutoModelForCausalLM

    make_config, dtype = CASES[name]
    model = quantized(tiny_llama(), make_config())
    directory = export_compressed_tensors(model, tmp_path / "ct")
    reloaded = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    ids = token_batches(seed=3)
    with torch.no_grad():
        expected = model(ids).logits
        actual = reloaded(ids).logits.float()
    assert ((actual - expected).norm() / expected.norm()).item() <= RTOL
