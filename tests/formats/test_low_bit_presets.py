"""INT3 g128 and INT2 g64 weight-only presets against a float64 reference written here: asymmetric codes
0..2**b - 1 per group of input columns, the range widened to contain 0, zero point rounded half-to-even."""

import pytest
import torch
from torch import nn

import lowbit


def asym_group_reference(weight: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Float64 fake quantization per group of ``group`` input columns, min/max of each group."""
    w = weight.double().reshape(weight.shape[0], -1, group)
    low = w.amin(-1, keepdim=True).clamp(max=0)
    high = w.amax(-1, keepdim=True).clamp(min=0)
    levels = 2**bits - 1
    step = (high - low) / levels
    zero = torch.clamp(torch.round(-low / step), 0, levels)
    codes = torch.clamp(torch.round(w / step) + zero, 0, levels)
    return ((codes - zero) * step).reshape(weight.shape)


@pytest.mark.parametrize(("preset", "bits", "group"), [("INT3_BLOCKWISE_WEIGHT_ONLY_CFG", 3, 128),
                                                       ("INT2_BLOCKWISE_WEIGHT_ONLY_CFG", 2, 64)])
def test_low_bit_preset_matches_float64_reference(preset, bits, group):
    generator = torch.Generator().manual_seed(bits)
    linear = nn.Linear(256, 24, bias=False)
    with torch.no_grad():
        weight = torch.randn(24, 256, generator=generator)
        weight[torch.rand(24, 256, generator=generator) < 0.01] *= 10  # outliers
        linear.weight.copy_(weight)
    model = nn.Sequential(linear)
    lowbit.quantize(model, lowbit.get_preset(preset))
    quantized = model[0].weight_quantizer(model[0].weight).detach()
    reference = asym_group_reference(weight, bits, group)
    # float32 vs float64: a code can flip only at an exact tie; none occur on random data
    torch.testing.assert_close(quantized.double(), reference, rtol=1e-6, atol=1e-6)
    assert max(len(row.unique()) for row in quantized.reshape(-1, group)) <= 2**bits
