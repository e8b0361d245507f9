"""Checks of an algorithm's numeric options, before the model is touched."""

from __future__ import annotations

from collections.abc import Callable

Rule = tuple[Callable[[object], bool], str]  # (accepts the value, what is allowed, in words)

STEP_RULES: dict[str, Rule] = {
    "iterations": (lambda value: value >= 1, "an int >= 1"),
    "lr": (lambda value: value > 0, "> 0"),
    "batches_per_step": (lambda value: value >= 0, "an int >= 0 (0: every batch each step)"),
}


def check_option_rules(algorithm: str, options: dict, rules: dict[str, Rule]) -> None:
    """ValueError naming the algorithm, the first option whose value its rule refuses, and what is allowed."""
    for key, (accepts, allowed) in rules.items():
        if not accepts(options[key]):
            raise ValueError(f"{algorithm}: {key}={options[key]!r} must be {allowed}")
