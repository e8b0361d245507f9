"""The search state: formats, decision groups with their costs and scores, the choice, the achieved bits.

``SearchState.save(path)`` writes it as JSON (atomically); ``SearchState.load(path)`` reads it back (a
corrupt or foreign file names itself). ``state.resolve(effective_bits)`` re-solves the stored scores and
costs for another budget without touching a model; ``lowbit.search.apply_search_state`` re-applies a state
to a fresh model (calibrating only the chosen formats, no scoring). Config dicts are stored with their
tuples and integer keys tagged (``{"__tuple__": [...]}``, ``{"__items__": [[key, value], ...]}``), so they
come back equal to what was given.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from lowbit.files import atomic_file, read_json
from lowbit.search.candidates import NONE
from lowbit.search.solver import solve_knapsack

WRITER = "lowbit.auto_quantize"
VERSION = 1
UNQUANTIZED_BITS = 16


@dataclass
class GroupState:
    """One decision group: its modules, weight elements (cost-weighted), bits and score per choice, the choice."""

    modules: list[str]
    numel: float
    bits: dict[str, float]
    scores: dict[str, float]
    choice: str = NONE


@dataclass
class SearchState:
    """Everything ``auto_quantize`` decided (module docstring). ``fixed_bits``/``fixed_numel``: the disabled
    modules, at 16 bits, in the effective bits' numerator and denominator."""

    method: str
    constraints: dict
    formats: dict[str, dict]
    groups: list[GroupState]
    disabled: list[str] = field(default_factory=list)
    fixed_numel: float = 0.0
    effective_bits: float = 0.0
    score: float = 0.0
    solver: dict = field(default_factory=dict)

    @property
    def choices(self) -> list[str]:
        """The choices of a group: NONE then the formats, in the order given."""
        return [NONE, *self.formats]

    @property
    def assignment(self) -> dict[str, str]:
        """{module: chosen format or NONE}."""
        return {name: group.choice for group in self.groups for name in group.modules}

    @property
    def total_numel(self) -> float:
        return math.fsum(g.numel for g in self.groups) + self.fixed_numel

    def bits_of(self, choice: list[str]) -> float:
        """Effective bits of one choice per group."""
        spent = math.fsum(g.bits[c] for g, c in zip(self.groups, choice, strict=True))
        return (spent + UNQUANTIZED_BITS * self.fixed_numel) / self.total_numel

    def min_bits(self) -> float:
        """The effective bits of the cheapest choice of every group."""
        return self.bits_of([min(g.bits, key=g.bits.get) for g in self.groups])

    def resolve(self, effective_bits: float) -> SearchState:
        """A copy with the choice minimising the total score at ``effective_bits`` (``solve_knapsack``)."""
        check_budget(effective_bits, self.min_bits())
        budget = effective_bits * self.total_numel - UNQUANTIZED_BITS * self.fixed_numel
        names = self.choices
        solution = solve_knapsack([[g.bits[c] for c in names] for g in self.groups],
                                  [[g.scores.get(c, 0.0) for c in names] for g in self.groups], budget)
        groups = [replace(g, choice=names[j]) for g, j in zip(self.groups, solution.choices, strict=True)]
        chosen = [g.choice for g in groups]
        return replace(self, groups=groups, constraints={**self.constraints, "effective_bits": effective_bits},
                       effective_bits=self.bits_of(chosen), score=solution.score,
                       solver={"method": "multiple-choice knapsack, dynamic programming over a cost grid",
                               "grid_step_bits": solution.grid_step, "cells": solution.cells,
                               "exact": solution.exact})

    def save(self, path: str | Path, overwrite: bool = True) -> Path:
        """Write the state as JSON to ``path`` atomically; returns the path."""
        document = {"writer": WRITER, "version": VERSION, **asdict(self)}
        document["formats"] = {name: _encode(config) for name, config in self.formats.items()}
        with atomic_file(path, overwrite=overwrite) as staging:
            staging.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> SearchState:
        """Read a state written by :meth:`save`; ValueError naming the file when it is not one."""
        file = Path(path)
        document = read_json(file, WRITER)
        if document.get("writer") != WRITER or document.get("version") != VERSION:
            raise ValueError(f"{file}: not an auto_quantize search state (writer {document.get('writer')!r}, version "
                             f"{document.get('version')!r}; expected {WRITER!r} version {VERSION})")
        try:
            groups = [GroupState(**group) for group in document["groups"]]
            formats = {name: _decode(config) for name, config in document["formats"].items()}
            return cls(document["method"], document["constraints"], formats, groups, document["disabled"],
                       document["fixed_numel"], document["effective_bits"], document["score"], document["solver"])
        except (KeyError, TypeError) as error:
            raise ValueError(f"{file}: auto_quantize search state with a missing or malformed field ({error!r})") \
                from None


def check_budget(effective_bits, lowest: float) -> None:
    """ValueError unless ``lowest <= effective_bits <= 16`` (``lowest``: every group at its cheapest choice)."""
    if isinstance(effective_bits, bool) or not isinstance(effective_bits, (int, float)) \
            or not math.isfinite(effective_bits):
        raise TypeError(f"constraints['effective_bits']={effective_bits!r}: expected a number of bits")
    if not lowest <= effective_bits <= UNQUANTIZED_BITS:
        raise ValueError(f"constraints['effective_bits']={effective_bits:g}: allowed is [{lowest:.4f}, "
                         f"{UNQUANTIZED_BITS}] (from every searched layer in the cheapest format, disabled layers at "
                         f"16 bits, to nothing quantized)")


def _encode(value):
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _encode(v) for k, v in value.items()}
        return {"__items__": [[_encode(k), _encode(v)] for k, v in value.items()]}
    return value


def _decode(value):
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_decode(v) for v in value["__tuple__"])
        if set(value) == {"__items__"}:
            return {_decode(k): _decode(v) for k, v in value["__items__"]}
        return {k: _decode(v) for k, v in value.items()}
    return value
