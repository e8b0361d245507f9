"""lowbit.progress: one switch hides every bar of lowbit's long loops (``lowbit ptq --no-progress``), and the
layer-wise bar shows per-layer errors only where they were measured (never a "nan")."""

from __future__ import annotations

import torch
from torch import nn

import lowbit
from lowbit.algorithms.layerwise import without_layer_errors
from lowbit.progress import progress, progress_bars


def test_progress_bars_switch_hides_and_restores():
    assert not progress(range(3)).disable
    with progress_bars(False):
        assert progress(range(3)).disable
        assert progress(total=3).disable
        with progress_bars(True):
            assert not progress(range(3)).disable
    assert not progress(range(3)).disable
    assert progress(range(3), disable=True).disable


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(128, 128)

    def forward(self, x):
        return x + self.linear(x)


class _Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(_Block() for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _quantize_awq(capsys, **switches):
    torch.manual_seed(0)
    model = _Stack()
    x = torch.randn(4, 8, 128)
    x[0, 0, 3] = 25.0  # an outlier channel
    with progress_bars(switches.get("shown", True)), without_layer_errors():
        lowbit.quantize(model, lowbit.INT4_AWQ_CFG, lambda m: m(x))
    return capsys.readouterr().err


def test_layerwise_bar_hidden_by_the_switch_and_shows_no_nan(capsys):
    shown = _quantize_awq(capsys)
    assert "nan" not in shown
    assert _quantize_awq(capsys, shown=False).strip() == ""
