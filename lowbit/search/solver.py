"""The exact assignment: a multiple-choice knapsack solved by dynamic programming over a cost grid.

Problem: groups ``i = 1..n``, each with choices ``j`` of cost ``c_ij >= 0`` and score ``s_ij``; pick one
choice per group to minimise ``sum_i s_i,j(i)`` subject to ``sum_i c_i,j(i) <= B``.

Reduction: each group's cheapest cost is paid up front (``c'_ij = c_ij - min_j c_ij``,
``B' = B - sum_i min_j c_ij``; ``B' < 0``: infeasible). Costs are then put on a grid of step ``u``:
``k_ij = ceil(c'_ij / u)`` cells, budget ``K = floor(B' / u)`` cells. When every cost is an integer
(bits) and ``u`` is the gcd of the shifted costs, the grid is exact: ``k`` and ``K`` are the costs
themselves divided by ``u``, and the solution is the optimum of the original problem. When that grid would
exceed ``max_cells`` (or costs are fractional: ``active_moe``), ``u = B' / max_cells`` and the solution is
the optimum on the grid; rounding costs *up* keeps it feasible for the original budget (``sum c <= u sum k
<= u K + sum min <= B``), at most ``n * u`` of budget left unused.

Recurrence, ``F_i[b]`` = least score of groups 1..i with grid cost at most ``b``:
``F_0[b] = 0``, ``F_i[b] = min_j (F_{i-1}[b - k_ij] + s_ij)`` over ``j`` with ``k_ij <= b``. It is kept
sparse: only the states where ``F_i`` steps down (the Pareto front of (grid cost, score) over groups 1..i,
``P_i <= K + 1`` states) can start an optimum, since later groups add the same to any state; each keeps its
choice and parent, and the choices are read back from the front's last state (cost <= K, least score).
Complexity: time O(n * m * P log(m P)) (m = choices per group, P = the largest front; a sort per group),
memory O(n * P), both at most the dense table's O(n * m * K) up to the log; the bundled model's 33 groups
(INT4 + FP8 + none, ~5e5 cells) keep a front of a few thousand states.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_CELLS = 1 << 22
MAX_STATES = 1 << 28  # bound on n * (K + 1): the fronts kept for reading back


@dataclass(frozen=True)
class Solution:
    """The chosen index per group, its total score and cost, and the grid it was solved on."""

    choices: tuple[int, ...]
    score: float
    cost: float
    grid_step: float
    cells: int
    exact: bool  # the grid step divides every cost: the optimum of the original problem


def solve_knapsack(costs: list[list[float]], scores: list[list[float]], budget: float,
                   max_cells: int = MAX_CELLS) -> Solution:
    """Minimise the total score under ``sum cost <= budget``, one choice per group (module docstring).

    ``costs[i][j]``, ``scores[i][j]``: group i's choice j. ValueError when
    even the cheapest choices exceed the budget.
    """
    _check(costs, scores, max_cells)
    floors = [min(row) for row in costs]
    spare = budget - math.fsum(floors)
    if spare < 0:
        raise ValueError(f"budget {budget:g} is below the cheapest assignment's cost {math.fsum(floors):g}")
    shifted = [[c - low for c in row] for row, low in zip(costs, floors, strict=True)]
    cells_per_group = max(2, min(max_cells, MAX_STATES // max(1, len(costs))))
    step, exact = _grid_step(shifted, spare, cells_per_group)
    cells = int(math.floor(spare / step + 1e-9)) if step > 0 else 0
    grid = [[int(math.ceil(c / step - 1e-9)) if step > 0 else 0 for c in row] for row in shifted]
    choices = _pareto_dp(grid, scores, cells)
    return Solution(choices, math.fsum(scores[i][j] for i, j in enumerate(choices)),
                    math.fsum(costs[i][j] for i, j in enumerate(choices)), step, cells, exact)


def _pareto_dp(grid: list[list[int]], scores: list[list[float]], cells: int) -> tuple[int, ...]:
    """The recurrence (module docstring) kept sparse: after group i, only the states ``(b, F_i[b])`` that no
    cheaper state matches or beats (the Pareto front, costs rising, scores strictly falling), each with its
    choice and parent state; the answer is the front's last (least-score) state, read back."""
    cost, score = np.zeros(1, dtype=np.int64), np.zeros(1)
    steps = []
    for row, row_scores in zip(grid, scores, strict=True):
        parents = np.arange(len(cost))
        cost_all = np.concatenate([cost + k for k in row])
        score_all = np.concatenate([score + s for s in row_scores])
        parent_all = np.tile(parents, len(row))
        choice_all = np.repeat(np.arange(len(row)), len(cost))
        fits = cost_all <= cells
        cost_all, score_all, parent_all, choice_all = (a[fits] for a in (cost_all, score_all, parent_all, choice_all))
        order = np.lexsort((choice_all, score_all, cost_all))  # by cost, then score, then first choice
        cost_all, score_all, parent_all, choice_all = (a[order] for a in (cost_all, score_all, parent_all, choice_all))
        earlier_best = np.minimum.accumulate(np.concatenate([[np.inf], score_all[:-1]]))
        front = score_all < earlier_best  # strictly better than every cheaper (or equal-cost earlier) state
        front[:1] = True  # the cheapest state stays, whatever its score
        cost, score = cost_all[front], score_all[front]
        steps.append((parent_all[front], choice_all[front]))
    state, choices = len(cost) - 1, []
    for parents, chosen in reversed(steps):
        choices.append(int(chosen[state]))
        state = int(parents[state])
    return tuple(reversed(choices))


def _grid_step(shifted: list[list[float]], spare: float, max_cells: int) -> tuple[float, bool]:
    """(step, exact): the gcd of the integer shifted costs when its grid fits ``max_cells``, else
    ``spare / max_cells``."""
    values = [c for row in shifted for c in row if c > 0]
    if not values:
        return 1.0, True
    if all(float(c).is_integer() for c in values):
        divisor = 0
        for c in values:
            divisor = math.gcd(divisor, int(c))
        if spare / divisor <= max_cells:
            return float(divisor), True
    return max(spare, 1e-300) / max_cells, False


def _check(costs, scores, max_cells) -> None:
    if len(costs) != len(scores) or any(len(c) != len(s) or not c for c, s in zip(costs, scores, strict=True)):
        raise ValueError("costs and scores must have the same non-empty rows (one entry per choice of each group)")
    if any(c < 0 or not math.isfinite(c) for row in costs for c in row):
        raise ValueError("costs must be finite and >= 0")
    if any(math.isnan(s) for row in scores for s in row):
        raise ValueError("scores must not be NaN")
    if isinstance(max_cells, bool) or not isinstance(max_cells, int) or max_cells < 1:
        raise ValueError(f"max_cells must be a positive int, got {max_cells!r}")
