"""The knapsack solver against brute force (every combination enumerated) on random small instances."""

import itertools
import math
import random

import pytest

from lowbit.search import solve_knapsack


def brute_force(costs, scores, budget):
    """Least total score over all choice combinations within the budget, or None when none fits."""
    best = None
    for combo in itertools.product(*(range(len(row)) for row in costs)):
        cost = sum(costs[i][j] for i, j in enumerate(combo))
        if cost <= budget:
            score = math.fsum(scores[i][j] for i, j in enumerate(combo))
            best = score if best is None else min(best, score)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_equals_brute_force_on_integer_costs(seed):
    rng = random.Random(seed)
    groups, choices = rng.randint(1, 6), rng.randint(1, 4)
    costs = [[rng.randint(0, 40) * rng.choice((1, 3, 8)) for _ in range(choices)] for _ in range(groups)]
    scores = [[rng.expovariate(1.0) * rng.choice((1, 1, 100)) for _ in range(choices)] for _ in range(groups)]
    budget = rng.uniform(sum(map(min, costs)), sum(map(max, costs)))
    expected = brute_force(costs, scores, budget)
    solution = solve_knapsack(costs, scores, budget)
    assert solution.exact
    assert solution.score == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert solution.cost <= budget
    assert solution.cost == sum(costs[i][j] for i, j in enumerate(solution.choices))


@pytest.mark.parametrize("seed", range(20))
def test_coarse_grid_stays_within_budget(seed):
    """Fractional costs (active_moe) go on a grid: never over budget, and never worse than brute force
    restricted to a budget shrunk by one grid step per group (what rounding up can cost)."""
    rng = random.Random(100 + seed)
    groups = rng.randint(2, 6)
    costs = [[rng.uniform(0, 50) for _ in range(3)] for _ in range(groups)]
    scores = [[rng.uniform(0, 10) for _ in range(3)] for _ in range(groups)]
    budget = rng.uniform(sum(map(min, costs)), sum(map(max, costs)))
    solution = solve_knapsack(costs, scores, budget, max_cells=64)
    assert not solution.exact
    assert solution.cost <= budget + 1e-9
    shrunk = brute_force(costs, scores, budget - groups * solution.grid_step)
    if shrunk is not None:
        assert solution.score <= shrunk + 1e-12
    assert solution.score >= brute_force(costs, scores, budget) - 1e-12


def test_infeasible_budget_and_bad_input_are_errors():
    with pytest.raises(ValueError, match="below the cheapest"):
        solve_knapsack([[4, 8], [4, 8]], [[1, 0], [1, 0]], 7)
    with pytest.raises(ValueError, match="same non-empty rows"):
        solve_knapsack([[4, 8]], [[1]], 10)
    with pytest.raises(ValueError, match="finite and >= 0"):
        solve_knapsack([[-1, 8]], [[1, 0]], 10)


def dense_dp(costs, scores, budget):
    """Least total score within an integer budget: the textbook table over every cost 0..budget."""
    best = [0.0] * (budget + 1)
    for row, row_scores in zip(costs, scores, strict=True):
        best = [min((best[b - c] + s for c, s in zip(row, row_scores, strict=True) if c <= b), default=math.inf)
                for b in range(budget + 1)]
    return best[budget]


@pytest.mark.parametrize("seed", range(10))
def test_equals_dense_table_on_larger_instances(seed):
    """Beyond brute force's reach (up to 30 groups of 5 choices): the sparse front equals the full table."""
    rng = random.Random(500 + seed)
    groups, choices = rng.randint(10, 30), rng.randint(2, 5)
    costs = [[rng.randint(0, 60) for _ in range(choices)] for _ in range(groups)]
    scores = [[rng.expovariate(1.0) for _ in range(choices)] for _ in range(groups)]
    budget = rng.randint(sum(map(min, costs)), sum(map(max, costs)))
    solution = solve_knapsack(costs, scores, budget)
    assert solution.score == pytest.approx(dense_dp(costs, scores, budget), rel=1e-12)
    assert solution.cost <= budget
