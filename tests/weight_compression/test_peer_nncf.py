"""Side by side with ``nncf.compress_weights`` (skipped without nncf): the same layers in 4 bits for every
sensitivity metric."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.weight_compression import SensitivityMetric, compress_weights

nncf = pytest.importorskip("nncf")
pytestmark = pytest.mark.peer


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=192, vocab_size=128, tie_word_embeddings=False)
    torch.manual_seed(0)  # transformers initialises from the global RNG; only the test touches it
    model = LlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # uneven layer scales, so that the metrics rank layers differently
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.mul_(0.5 + torch.rand((), generator=generator) * 2)
    return model


def _dataset() -> list[dict]:
    generator = torch.Generator().manual_seed(2)
    return [{"input_ids": torch.randint(0, 128, (1, 12 + 4 * i), generator=generator)} for i in range(3)]


def _linear_numels(model: nn.Module) -> dict[str, int]:
    return {name: m.weight.numel() for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _nncf_four_bit(metric: SensitivityMetric, ratio: float) -> set[str]:
    """Layers NNCF packs to 4 bits (their uint8 weight holds two codes per byte, so it shrinks)."""
    model = _tiny_llama()
    numels = _linear_numels(model)
    # NNCF traces torch models with the dataset, so it gets one even for the data-free metric
    nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_ASYM, group_size=32, ratio=ratio,
                          dataset=nncf.Dataset(_dataset()), sensitivity_metric=nncf.SensitivityMetric(metric.value))
    return {name for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight.numel() < numels[name]}


@pytest.mark.parametrize("metric", list(SensitivityMetric), ids=lambda m: m.value)
def test_same_four_bit_layers_as_nncf(metric):
    ratio = 0.6
    model = _tiny_llama()
    dataset = _dataset() if metric.is_data_aware else None
    compress_weights(model, mode="int4_asym", group_size=32, ratio=ratio, dataset=dataset, sensitivity_metric=metric,
                     packed=False)
    ours = {name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and m.weight_quantizer.is_enabled and m.weight_quantizer.num_bits == 4}
    assert ours == _nncf_four_bit(metric, ratio)
    assert 0 < len(ours) < 20


@pytest.mark.parametrize(("mode", "bits", "group"), [("INT4_SYM", 4, 32), ("INT8_SYM", 8, -1)])
def test_signed_scale_codes_equal_nncf(mode, bits, group):
    """lowbit's signed-scale grid (``formats.quantize_int_signed_scale``) against NNCF's own
    ``do_integer_quantization``: the same codes and the same signed steps (float32 rounding), on weights
    with outliers of both signs."""
    from nncf.quantization.algorithms.weight_compression.config import WeightCompressionConfig
    from nncf.quantization.algorithms.weight_compression.weight_lowering import do_integer_quantization
    from nncf.tensor import Tensor

    from lowbit import formats

    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(16, 128, generator=generator) * 0.05
    weight = torch.where(torch.rand(16, 128, generator=generator) < 0.02, weight * 12, weight)
    groups = weight.reshape(16, -1, 128 if group == -1 else group)
    config = WeightCompressionConfig(mode=getattr(nncf.CompressWeightsMode, mode), group_size=group)
    peer = do_integer_quantization(Tensor(weight), config, reduction_axes=(1,))  # NNCF groups the (out, in) weight
    codes, scale = formats.quantize_int_signed_scale(groups, groups.amin(-1, keepdim=True),
                                                     groups.amax(-1, keepdim=True), bits)
    torch.testing.assert_close(1.0 / scale, peer.scale.data.float().reshape(scale.shape), rtol=1e-6, atol=0)
    mismatched = (codes != peer.tensor.data.float().reshape(codes.shape)).float().mean().item()
    assert mismatched <= 1e-3  # x * (1/step) and x / step may round a value on a code boundary apart
    assert (scale < 0).any() and (scale > 0).any()
