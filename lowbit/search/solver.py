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
``F_0[b] = 0``, ``F_i[b] = min_j (F_{i-1}[b - k_ij] + s_ij)`` over ``j`` with ``k_ij <= b``; the argmin
is kept per (i, b) and the choices are read back from ``b = K``.
Complexity: time O(n * m * K) (m = choices per group, one vector operation per (i, j)), memory O(n * K)
bytes for the argmin table (int8), so ``max_cells`` bounds both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_CELLS = 1 << 22
MAX_TABLE_BYTES = 1 << 28


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

    ``costs[i][j]``, ``scores[i][j]``: group i's choice j (at most 127 choices a group). ValueError when
    even the cheapest choices exceed the budget.
    """
    _check(costs, scores, max_cells)
    floors = [min(row) for row in costs]
    spare = budget - math.fsum(floors)
    if spare < 0:
        raise ValueError(f"budget {budget:g} is below the cheapest assignment's cost {math.fsum(floors):g}")
    shifted = [[c - low for c in row] for row, low in zip(costs, floors, strict=True)]
    cells_per_group = max(2, min(max_cells, MAX_TABLE_BYTES // max(1, len(costs))))
    step, exact = _grid_step(shifted, spare, cells_per_group)
    cells = int(math.floor(spare / step + 1e-9)) if step > 0 else 0
    grid = [[int(math.ceil(c / step - 1e-9)) if step > 0 else 0 for c in row] for row in shifted]
    best = np.zeros(cells + 1)
    table = np.zeros((len(costs), cells + 1), dtype=np.int8)
    for i, (row, row_scores) in enumerate(zip(grid, scores, strict=True)):
        new = np.full(cells + 1, np.inf)
        for j, (k, score) in enumerate(zip(row, row_scores, strict=True)):
            if k > cells:
                continue
            candidate = np.full(cells + 1, np.inf)
            candidate[k:] = best[: cells + 1 - k] + score
            better = candidate < new
            new[better] = candidate[better]
            table[i, better] = j
        best = new
    choices, b = [], cells
    for i in reversed(range(len(costs))):
        j = int(table[i, b])
        choices.append(j)
        b -= grid[i][j]
    choices.reverse()
    return Solution(tuple(choices), math.fsum(scores[i][j] for i, j in enumerate(choices)),
                    math.fsum(costs[i][j] for i, j in enumerate(choices)), step, cells, exact)


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
    if any(len(row) > 127 for row in costs):
        raise ValueError("at most 127 choices a group (the argmin table is int8)")
    if any(c < 0 or not math.isfinite(c) for row in costs for c in row):
        raise ValueError("costs must be finite and >= 0")
    if any(math.isnan(s) for row in scores for s in row):
        raise ValueError("scores must not be NaN")
    if isinstance(max_cells, bool) or not isinstance(max_cells, int) or max_cells < 1:
        raise ValueError(f"max_cells must be a positive int, got {max_cells!r}")
