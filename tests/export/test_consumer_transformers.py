"""transformers (with compressed-tensors installed) reloads lowbit's compressed-tensors exports.

Every export format is reloaded with ``AutoModelForCausalLM.from_pretrained`` and its logits compared with
lowbit's quantized model (float32): within 1e-2 relative (Frobenius norm over the batch). NVFP4 reloads in
bfloat16, because compressed-tensors 0.20 decompresses NVFP4 weights to bfloat16 whatever the model dtype, and
NVFP4 W4A4 is read with ``run_compressed=False``, where transformers 5.25 keeps activations unquantized (measured:
17.9% off lowbit's W4A4 model, 0.7% off the same model with its input quantizers disabled), so it is compared
with lowbit's weights-only model. With the default ``run_compressed=True`` the logits are 18% off both (not
understood; reported in bench/results/export_consumers.md).
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
CASES = {  # name: (config, dtype, reference: "quantized" or "weights only")
    "FP8 tensor, static activations": (lambda: preset("FP8_DEFAULT_CFG"), torch.float32, "quantized"),
    "FP8 channel, per-token activations": (lambda: preset("FP8_PER_CHANNEL_PER_TOKEN_CFG"), torch.float32, "quantized"),
    "FP8 128x128 blocks": (lambda: preset("FP8_DEFAULT_CFG", **BLOCK_FP8), torch.float32, "quantized"),
    "W4A16 g128": (lambda: preset("INT4_BLOCKWISE_WEIGHT_ONLY_CFG"), torch.float32, "quantized"),
    "W8A16 channel": (lambda: preset("INT8_WEIGHT_ONLY_CFG"), torch.float32, "quantized"),
    "W8A8 INT8 SmoothQuant": (lambda: preset("INT8_SMOOTHQUANT_CFG", **NORM_FED_W8A8), torch.float32, "quantized"),
    "NVFP4": (lambda: preset("NVFP4_DEFAULT_CFG"), torch.bfloat16, "weights only"),
    "W4A16 NVFP4": (lambda: preset("W4A16_NVFP4_CFG"), torch.bfloat16, "quantized"),
}


def disable_inputs(model):
    return [m.input_quantizer for m in model.modules() if hasattr(m, "input_quantizer")]


@pytest.mark.parametrize("name", sorted(CASES))
def test_transformers_reloads_the_export(tmp_path, name):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    make_config, dtype, reference = CASES[name]
    model = quantized(tiny_llama(), make_config())
    directory = export_compressed_tensors(model, tmp_path / "ct")
    options = {}
    if reference == "weights only":
        options["quantization_config"] = CompressedTensorsConfig(run_compressed=False)
    reloaded = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **options).eval()
    ids = token_batches(seed=3)
    if reference == "weights only":
        for quantizer in disable_inputs(model):
            quantizer.disable()
    with torch.no_grad():
        expected = model(ids).logits
        actual = reloaded(ids).logits.float()
    assert ((actual - expected).norm() / expected.norm()).item() <= RTOL
