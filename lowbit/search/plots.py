"""Two pictures of a search, as PNG through matplotlib (the optional extra ``plot``).

- :func:`plot_pareto`: the Pareto front, predicted total score (left axis, log) and measured perplexity
  (right axis) against effective bits, one point per budget of a sweep (:func:`pareto_front` re-solves the
  stored scores, no model needed; perplexities are measured by the caller).
- :func:`plot_layer_scores`: per decision group, the score of each format (log bars) with the chosen
  choice marked, groups in model order.
"""

from __future__ import annotations

from pathlib import Path

from lowbit.files import atomic_file
from lowbit.search.state import SearchState


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("lowbit.search.plots needs matplotlib: pip install 'lowbit[plot]'") from None
    return plt


def pareto_front(state: SearchState, budgets: list[float]) -> list[SearchState]:
    """The state re-solved at each budget (``SearchState.resolve``), in the order given."""
    return [state.resolve(bits) for bits in budgets]


def plot_pareto(front: list[SearchState], path: str | Path, perplexities: list[float] | None = None,
                title: str = "auto_quantize: Pareto front") -> Path:
    """PNG of predicted score (and measured ``perplexities``, one per state) vs effective bits."""
    if perplexities is not None and len(perplexities) != len(front):
        raise ValueError(f"perplexities: {len(perplexities)} values for {len(front)} states")
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    bits = [s.effective_bits for s in front]
    axis.plot(bits, [max(s.score, 1e-30) for s in front], "o-", color="tab:blue", label="predicted score")
    axis.set_yscale("log")
    axis.set_xlabel("effective bits (scales included)")
    axis.set_ylabel(f"predicted score ({front[0].method})", color="tab:blue")
    if perplexities is not None:
        right = axis.twinx()
        right.plot(bits, perplexities, "s--", color="tab:red", label="measured perplexity")
        right.set_ylabel("perplexity", color="tab:red")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    return _save(plt, figure, path)


def plot_layer_scores(state: SearchState, path: str | Path,
                      title: str = "auto_quantize: scores and choice per layer group") -> Path:
    """PNG bar chart: each group's score per format (log scale), the chosen choice outlined in black."""
    plt = _pyplot()
    formats = list(state.formats)
    figure, axis = plt.subplots(figsize=(max(6, 0.35 * len(state.groups)), 4.5))
    width = 0.8 / len(formats)
    for k, name in enumerate(formats):
        xs = [i + (k - (len(formats) - 1) / 2) * width for i in range(len(state.groups))]
        heights = [max(g.scores[name], 1e-30) for g in state.groups]
        edges = ["black" if g.choice == name else "none" for g in state.groups]
        axis.bar(xs, heights, width, label=name, edgecolor=edges, linewidth=1.5)
    axis.set_yscale("log")
    axis.set_xticks(range(len(state.groups)))
    axis.set_xticklabels([_short(g.modules) + ("" if g.choice != "none" else " (none)") for g in state.groups],
                         rotation=90, fontsize=7)
    axis.set_ylabel(f"score ({state.method}); black edge: chosen")
    axis.set_title(f"{title}\n{state.effective_bits:.3f} effective bits")
    axis.legend(fontsize=8)
    return _save(plt, figure, path)


def _short(modules: list[str]) -> str:
    """'layers.3.self_attn.q/k/v_proj' style label of a group."""
    first = modules[0].removeprefix("model.")
    if len(modules) == 1:
        return first
    prefix = first.rsplit(".", 1)[0]
    return f"{prefix}.{'/'.join(m.rsplit('.', 1)[-1] for m in modules)}"


def _save(plt, figure, path: str | Path) -> Path:
    figure.tight_layout()
    target = Path(path)
    with atomic_file(target, overwrite=True) as staging:
        figure.savefig(staging, format="png", dpi=110)
    plt.close(figure)
    return target
