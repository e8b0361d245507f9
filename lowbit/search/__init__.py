"""Per-layer format search under an effective-bits budget (``auto_quantize``).

One module per job: ``candidates`` (formats, searched modules, decision groups), ``cost`` (effective bits),
``calibrated`` (each format calibrated, switching modules among them), ``scores`` (gradient and KL
sensitivity), ``solver`` (the exact multiple-choice knapsack), ``state`` (JSON save / load / re-solve),
``plots`` (Pareto front and per-layer chart, matplotlib optional), ``auto`` (the entry points), ``command``
(the CLI flags of ``lowbit quantize``).
"""

from lowbit.search.auto import apply_search_state, auto_quantize
from lowbit.search.solver import Solution, solve_knapsack
from lowbit.search.state import SearchState

__all__ = ["SearchState", "Solution", "apply_search_state", "auto_quantize", "solve_knapsack"]
