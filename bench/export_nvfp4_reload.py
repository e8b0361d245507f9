"""Why transformers' reload of an NVFP4 W4A4 compressed-tensors export is ~15% off lowbit's model.

Protocol (fixed seeds; the tiny 1-layer Llama of tests/export/tiny.py, calibrated on its token batches; needs
transformers and compressed-tensors): quantize with NVFP4_DEFAULT_CFG (W4A4) and W4A16_NVFP4_CFG, export with
``export_compressed_tensors``, reload with ``from_pretrained(dtype=bfloat16)`` (compressed-tensors decompresses
NVFP4 to bfloat16), and print relative L2 differences of the logits (batch of tests/export/tiny.py, seed 3):
reload vs lowbit (float32); lowbit run in bfloat16 vs lowbit; lowbit with its dequantized weights rounded to
bfloat16 (float32 compute) vs lowbit; and, for the first q_proj on the same float32 input, compressed-tensors'
activation quantization vs lowbit's, its weight vs lowbit's fake-quantized weight.

    PYTHONPATH=$PWD python bench/export_nvfp4_reload.py
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lowbit.export import export_compressed_tensors  # noqa: E402
from tests.export.tiny import preset, quantized, tiny_llama, token_batches  # noqa: E402


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def bf16_weights(model):
    """A copy of ``model`` whose quantized weights are lowbit's dequantized ones rounded to bfloat16, held fixed."""
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for module in rounded.modules():
            quantizer = getattr(module, "weight_quantizer", None)
            if quantizer is not None and quantizer.is_enabled:
                module.weight.copy_(quantizer(module.weight).to(torch.bfloat16).float())
                quantizer.disable()
    return rounded


def main() -> None:
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize
    from transformers import AutoModelForCausalLM

    base, ids = tiny_llama(), token_batches(seed=3)
    print("| config | reload vs lowbit | lowbit in bf16 vs lowbit | lowbit, bf16-rounded weights vs lowbit | "
          "q_proj input quantization: reload vs lowbit | q_proj weight: reload vs lowbit |")
    print("|---|---|---|---|---|---|")
    for name in ("NVFP4_DEFAULT_CFG", "W4A16_NVFP4_CFG"):
        model = quantized(base, preset(name))
        with tempfile.TemporaryDirectory() as scratch:
            reloaded = AutoModelForCausalLM.from_pretrained(export_compressed_tensors(model, Path(scratch) / "ct"),
                                                            dtype=torch.bfloat16).eval()
        x = torch.randn(2, 16, 256, generator=torch.Generator().manual_seed(0))
        ours, theirs = model.model.layers[0].self_attn.q_proj, reloaded.model.layers[0].self_attn.q_proj
        with torch.no_grad():
            reference = model(ids).logits
            logits = reloaded(ids).logits
            in_bf16 = copy.deepcopy(model).to(torch.bfloat16)(ids).logits
            rounded = bf16_weights(model)(ids).logits
            scheme = theirs.quantization_scheme.input_activations
            inputs = "-" if scheme is None else (
                f"{relative(forward_quantize(theirs, x, 'input', scheme), ours.input_quantizer(x)):.2e}")
            weight = relative(theirs.weight.float(), ours.weight_quantizer(ours.weight))
        print(f"| {name} | {relative(logits, reference):.2e} | {relative(in_bf16, reference):.2e} | "
              f"{relative(rounded, reference):.2e} | {inputs} | {weight:.2e} |")


if __name__ == "__main__":
    main()
