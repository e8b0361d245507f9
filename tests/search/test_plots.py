"""The Pareto front and per-layer pictures are written as PNG files; without matplotlib, a clear error."""

import struct
import sys

import pytest

from lowbit.search.plots import pareto_front, plot_layer_scores, plot_pareto

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    return struct.unpack(">II", data[16:24])


def test_plots_are_written(searched, tmp_path):
    pytest.importorskip("matplotlib")
    _, state = searched
    front = pareto_front(state, [4.6, 5.0, 6.0, 8.0, 12.0])
    assert [s.effective_bits <= b for s, b in zip(front, [4.6, 5.0, 6.0, 8.0, 12.0], strict=True)] == [True] * 5
    scores = [s.score for s in front]
    assert scores == sorted(scores, reverse=True)  # more bits never predict a worse score
    pareto = plot_pareto(front, tmp_path / "pareto.png", perplexities=[30.0, 29.0, 28.5, 28.1, 28.0])
    layers = plot_layer_scores(state, tmp_path / "layers.png")
    for path in (pareto, layers):
        width, height = png_size(path)
        assert width > 300 and height > 200


def test_missing_matplotlib_names_the_extra(searched, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(ImportError, match=r"lowbit\[plot\]"):
        plot_layer_scores(searched[1], tmp_path / "layers.png")
    assert not (tmp_path / "layers.png").exists()
