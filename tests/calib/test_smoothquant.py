"""SmoothQuant's scale formula (float64 reference)."""

import pytest
import torch

from lowbit.calib.smoothquant import check_alpha, smoothquant_scale


def test_scale_equals_the_formula():
    generator = torch.Generator().manual_seed(3)
    activation = torch.rand(48, generator=generator, dtype=torch.float64) * 30 + 0.01
    weight = torch.rand(48, generator=generator, dtype=torch.float64) + 0.01
    for alpha in (0.0, 0.5, 0.85, 1.0):
        expected = activation**alpha / weight ** (1 - alpha)
        torch.testing.assert_close(smoothquant_scale(activation, weight, alpha).double(), expected, rtol=1e-6, atol=0)


def test_zero_channels_keep_scale_one():
    activation = torch.tensor([0.0, 2.0, 3.0])
    weight = torch.tensor([1.0, 0.0, 4.0])
    assert smoothquant_scale(activation, weight, 0.5).tolist() == pytest.approx([1.0, 1.0, (3 / 4) ** 0.5])


def test_errors():
    with pytest.raises(ValueError, match="in_features"):
        smoothquant_scale(torch.ones(3), torch.ones(4), 0.5)
    for alpha in (-0.1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="alpha"):
            check_alpha(alpha)
