"""auto_quantize: per-layer formats chosen to minimise the estimated loss under an effective-bits budget.

    model, state = lowbit.auto_quantize(model, constraints={"effective_bits": 4.8},
                                        quantization_formats=["NVFP4_DEFAULT_CFG", "FP8_DEFAULT_CFG"],
                                        data_loader=batches, forward_step=lambda m, b: m(**b),
                                        loss_func=lambda out, b: out.loss)

1. Validate everything and compute every module's bits per format from shapes and configs
   (``lowbit.search.cost``); a budget outside [all searched layers in their cheapest format, 16] is an
   error here, before the model is touched.
2. Calibrate each format with its own algorithm over every searched module, keeping each module's
   state per format (``lowbit.search.calibrated``), on the first ``num_calib_steps`` batches (a quarter of
   them for AWQ: :func:`calibration_steps`).
3. Trace one batch for the decision groups (fused q/k/v, gate/up, one MoE layer's experts:
   ``lowbit.search.candidates``): the first score batch's forward (``method="gradient"``), else one more.
4. Score each group in each format on the first ``num_score_steps`` batches (``lowbit.search.scores``), the
   gradient's forward and backward in ``score_dtype`` (:func:`resolve_score_dtype`).
5. Solve the multiple-choice knapsack exactly (``lowbit.search.solver``), apply the choice.

Returns ``(model, SearchState)``; the state saves to JSON and re-applies with :func:`apply_search_state`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from lowbit.modules import is_quantized
from lowbit.search.calibrated import CalibratedModules
from lowbit.search.candidates import (
    DEFAULT_DISABLED_LAYERS,
    NONE,
    GroupTracing,
    SearchFormat,
    decision_groups,
    search_formats,
    searched_modules,
)
from lowbit.search.cost import COST_MODELS, ModuleCost, cheapest_bits, expert_ratio, module_costs
from lowbit.search.scores import METHODS, gradient_scores, kl_scores
from lowbit.search.state import GroupState, SearchState, check_budget

CONSTRAINT_KEYS = ("effective_bits", "auto_quantize_bits", "cost_model", "cost")
AWQ_STEP_DIVISOR = 4


def auto_quantize(
    model: nn.Module,
    constraints: dict | None = None,
    quantization_formats: list | None = None,
    data_loader: Iterable | None = None,
    forward_step: Callable | None = None,
    loss_func: Callable | None = None,
    method: str = "gradient",
    num_calib_steps: int = 512,
    num_score_steps: int = 128,
    disabled_layers: str | list[str] | None = DEFAULT_DISABLED_LAYERS,
    checkpoint: str | Path | None = None,
    score_dtype: torch.dtype | str | None = "auto",
) -> tuple[nn.Module, SearchState]:
    """Choose a format (or none) per decision group of ``model`` under ``constraints`` (module docstring).

    ``constraints``: ``{"effective_bits": b}`` (``"auto_quantize_bits"`` is the same key, ModelOpt's older
    name), optional ``"cost_model": "weight" | "active_moe"`` and ``"cost": {"active_moe_expert_ratio": r}``
    (``lowbit.search.cost``). ``quantization_formats``: preset names or config dicts (default NVFP4 + FP8).
    ``data_loader``: a re-iterable of batches; ``forward_step(model, batch)`` returns the output;
    ``loss_func(output, batch)`` a scalar loss (``method="gradient"``; ``"kl_div"`` needs none and wants
    logits from ``forward_step``). ``disabled_layers``: module-name wildcards kept float (default: MoE routers).
    ``checkpoint``: a search-state file; when it exists (same formats and method), its scores are re-solved for
    this budget and applied without scoring (:func:`apply_search_state`), else the search writes it.
    ``score_dtype``: the precision of the gradient scores' forward and backward (:func:`resolve_score_dtype`);
    the calibration and the model returned are not affected.
    """
    if checkpoint is not None and Path(checkpoint).is_file():
        return model, _resume(model, SearchState.load(checkpoint), constraints, quantization_formats, data_loader,
                              forward_step, method, num_calib_steps)
    calibrated, state = search(model, constraints, quantization_formats, data_loader, forward_step, loss_func,
                               method, num_calib_steps, num_score_steps, disabled_layers, score_dtype)
    calibrated.apply(state.assignment)
    if checkpoint is not None:
        state.save(checkpoint)
    return model, state


def _resume(model: nn.Module, state: SearchState, constraints, quantization_formats, data_loader, forward_step,
            method: str, num_calib_steps: int) -> SearchState:
    """The checkpoint's state re-solved for ``constraints`` and applied; ValueError when it was searched with
    other formats or another method."""
    formats = search_formats(quantization_formats or ["NVFP4_DEFAULT_CFG", "FP8_DEFAULT_CFG"])
    if {f.name: f.config for f in formats} != state.formats or method != state.method:
        raise ValueError(f"checkpoint was searched with formats {list(state.formats)} and method {state.method!r}, "
                         f"not {[f.name for f in formats]} and {method!r}: pass another checkpoint path")
    constraints = dict(constraints or {"effective_bits": 4.8})
    state = state.resolve(_budget(constraints))
    apply_search_state(model, state, data_loader, forward_step, num_calib_steps)
    return state


def search(model: nn.Module, constraints: dict | None = None, quantization_formats: list | None = None,
           data_loader: Iterable | None = None, forward_step: Callable | None = None,
           loss_func: Callable | None = None, method: str = "gradient", num_calib_steps: int = 512,
           num_score_steps: int = 128, disabled_layers: str | list[str] | None = DEFAULT_DISABLED_LAYERS,
           score_dtype: torch.dtype | str | None = "auto") -> tuple[CalibratedModules, SearchState]:
    """:func:`auto_quantize`'s steps 1-5 without applying the choice: the calibrated candidates stay
    switchable, so other budgets are a re-solve and a switch away
    (``calibrated.apply(state.resolve(bits).assignment)``); the model is left in NONE (float)."""
    if constraints is not None and not isinstance(constraints, dict):
        raise TypeError(f"constraints={constraints!r}: expected a dict such as {{'effective_bits': 4.8}}")
    constraints = dict(constraints or {"effective_bits": 4.8})
    formats, searched, disabled, costs, fixed_numel, bits = _prepare(
        model, constraints, quantization_formats, data_loader, forward_step, loss_func, method, num_calib_steps,
        num_score_steps, disabled_layers)
    dtype = resolve_score_dtype(score_dtype, model)
    calibrated = calibrate_formats(model, formats, searched, data_loader, forward_step, num_calib_steps)
    calibrated.apply({})
    names = [f.name for f in formats]
    score_batches = list(itertools.islice(data_loader, num_score_steps))
    if not score_batches:
        raise ValueError("data_loader gave no batch to score with")
    if method == "gradient":
        tracing = GroupTracing(model, searched)  # rides on the first score batch's forward
        module_scores = gradient_scores(calibrated, names, score_batches, forward_step, loss_func, dtype, tracing)
        groups = tracing.groups
        group_scores = [{f: math.fsum(module_scores[m][f] for m in group) for f in names} for group in groups]
    else:
        with torch.no_grad():
            groups = decision_groups(model, searched, lambda m: forward_step(m, score_batches[0]))
        group_scores = kl_scores(calibrated, groups, names, score_batches, forward_step)
    group_states = [_group_state(group, costs, scores) for group, scores in zip(groups, group_scores, strict=True)]
    state = SearchState(method, {**constraints, "effective_bits": bits}, {f.name: f.config for f in formats},
                        group_states, disabled, fixed_numel).resolve(bits)
    return calibrated, state


def _prepare(model, constraints, quantization_formats, data_loader, forward_step, loss_func, method,
             num_calib_steps, num_score_steps, disabled_layers):
    """Step 1: every argument validated, every module's bits per format computed, the budget checked against
    them; (formats, searched, disabled, costs, disabled elements, budget). ``constraints`` is normalised in place."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    _check_float(model)
    bits = _budget(constraints)
    _check_arguments(data_loader, forward_step, loss_func, method, num_calib_steps, num_score_steps)
    formats = search_formats(quantization_formats or ["NVFP4_DEFAULT_CFG", "FP8_DEFAULT_CFG"])
    searched, disabled = searched_modules(model, disabled_layers)
    if not searched:
        raise ValueError(f"{type(model).__name__} has no module with quantizable weights outside disabled_layers="
                         f"{disabled_layers!r}")
    ratio = expert_ratio(model, constraints)
    costs = module_costs(model, formats, searched, ratio)
    fixed_numel = math.fsum(c.weight * c.numel for c in module_costs(model, [], disabled, ratio).values())
    check_budget(bits, cheapest_bits(costs, fixed_numel))
    return formats, searched, disabled, costs, fixed_numel, float(bits)


def apply_search_state(model: nn.Module, state: SearchState, data_loader: Iterable, forward_step: Callable,
                       num_calib_steps: int = 512) -> nn.Module:
    """Quantize ``model`` (float) as ``state`` chose, without scoring: each chosen format is calibrated as in the
    search (over every searched module, the first ``num_calib_steps`` batches), then each module set."""
    if not isinstance(state, SearchState):
        raise TypeError(f"state: expected a SearchState (SearchState.load(path)), got {type(state).__name__}")
    _check_float(model)
    _check_arguments(data_loader, forward_step, None, "kl_div", num_calib_steps, 1)
    modules = [name for group in state.groups for name in group.modules]
    present = {name for name, _ in model.named_modules()}
    missing = [name for name in modules if name not in present]
    if missing:
        raise ValueError(f"state names modules this model lacks: {missing[:5]} ({len(missing)} in all)")
    chosen = {group.choice for group in state.groups} - {NONE}
    formats = [SearchFormat.parse(name, config) for name, config in state.formats.items() if name in chosen]
    calibrated = calibrate_formats(model, formats, modules, data_loader, forward_step, num_calib_steps)
    calibrated.apply(state.assignment)
    return model


def calibrate_formats(model: nn.Module, formats: list[SearchFormat], modules: list[str], data_loader: Iterable,
                      forward_step: Callable, num_calib_steps: int) -> CalibratedModules:
    """Every format calibrated over ``modules`` with its own algorithm (``CalibratedModules.calibrate``) on the
    first ``calibration_steps`` batches of ``data_loader``. An AWQ scale search compares its candidates' losses
    in bfloat16 where :func:`resolve_score_dtype` gives bfloat16 for ``"auto"`` (AWQ's ``loss_dtype``: the
    search's matmuls ~4x faster there; none of the bundled model's 57 choices changed), so that a search and
    :func:`apply_search_state` on one machine calibrate alike."""
    calibrated = CalibratedModules(model, modules)
    awq_loss_dtype = "bfloat16" if resolve_score_dtype("auto", model) == torch.bfloat16 else None
    for search_format in formats:
        steps = calibration_steps(search_format, num_calib_steps)
        calibrated.calibrate(search_format, _steps(data_loader, forward_step, steps), awq_loss_dtype=awq_loss_dtype)
    return calibrated


def calibration_steps(search_format: SearchFormat, num_calib_steps: int) -> int:
    """Batches a format calibrates on: ``num_calib_steps``, but a quarter of them (at least one) for the AWQ
    family, whose scale search runs ~11 forwards of every layer per batch (ModelOpt's auto_quantize does the
    same)."""
    if str(search_format.parsed.algorithm).startswith("awq"):
        return max(1, num_calib_steps // AWQ_STEP_DIVISOR)
    return num_calib_steps


def resolve_score_dtype(score_dtype: torch.dtype | str | None, model: nn.Module) -> torch.dtype | None:
    """The gradient scores' precision: ``"auto"`` is bfloat16 for a float32 model on a device with native
    bfloat16 matmuls (a CUDA GPU that supports them; a CPU with AVX512-BF16 or AMX, where they run ~4x float32's
    speed), else None, the model's own dtype; None or a floating torch.dtype is taken as given."""
    if score_dtype is None or (isinstance(score_dtype, torch.dtype) and score_dtype.is_floating_point):
        return score_dtype
    if score_dtype != "auto":
        raise ValueError(f"score_dtype={score_dtype!r}: allowed are 'auto', None or a floating torch.dtype "
                         "(e.g. torch.bfloat16)")
    parameter = next(model.parameters(), None)
    if parameter is None or parameter.dtype != torch.float32:
        return None
    return torch.bfloat16 if native_bf16_matmuls(parameter.device) else None


def native_bf16_matmuls(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices natively: a CUDA GPU that supports them, a CPU with
    AVX512-BF16 or AMX (~4x float32's speed there)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported",
                                                                          "_is_amx_tile_supported"))
    return False


def _group_state(group: list[str], costs: dict[str, ModuleCost], scores: dict[str, float]) -> GroupState:
    names = list(costs[group[0]].bits)
    return GroupState(list(group), math.fsum(costs[m].weight * costs[m].numel for m in group),
                      {c: math.fsum(costs[m].cost(c) for m in group) for c in names},
                      {NONE: 0.0, **scores})


def _steps(data_loader: Iterable, forward_step: Callable, steps: int) -> Callable[[nn.Module], None]:
    def forward_loop(model: nn.Module) -> None:
        with torch.no_grad():
            for batch in itertools.islice(data_loader, steps):
                forward_step(model, batch)

    return forward_loop


def _check_float(model: nn.Module) -> None:
    """auto_quantize starts from the float model: one already quantized may hold weights an algorithm scaled."""
    quantized = [name for name, module in model.named_modules() if is_quantized(module)]
    if quantized:
        raise ValueError(f"model is already quantized ({quantized[0]} and {len(quantized) - 1} more): auto_quantize "
                         "takes the float model (its calibrated candidates live in the search: lowbit.search.auto."
                         "search keeps them switchable)")


def _budget(constraints: dict):
    unknown = set(constraints) - set(CONSTRAINT_KEYS)
    if unknown:
        raise ValueError(f"constraints has unknown key(s) {sorted(unknown)}; allowed are {list(CONSTRAINT_KEYS)}")
    given = [constraints[k] for k in ("effective_bits", "auto_quantize_bits") if k in constraints]
    if not given or (len(given) == 2 and given[0] != given[1]):
        raise ValueError(f"constraints={constraints!r}: give the budget once, as 'effective_bits' (or "
                         "'auto_quantize_bits', the same constraint)")
    constraints.pop("auto_quantize_bits", None)
    constraints["effective_bits"] = given[0]
    cost_model = constraints.setdefault("cost_model", "weight")
    if cost_model not in COST_MODELS:
        raise ValueError(f"constraints['cost_model']={cost_model!r}: allowed are {list(COST_MODELS)}")
    if not isinstance(constraints.setdefault("cost", {}), dict):
        raise TypeError(f"constraints['cost']={constraints['cost']!r}: expected a dict")
    return given[0]


def _check_arguments(data_loader, forward_step, loss_func, method, num_calib_steps, num_score_steps) -> None:
    if method not in METHODS:
        raise ValueError(f"method={method!r}: allowed are {list(METHODS)}")
    if data_loader is None or not isinstance(data_loader, Iterable) or iter(data_loader) is data_loader:
        raise TypeError(f"data_loader={data_loader!r:.60}: expected a re-iterable of batches (a list or a "
                        "torch DataLoader; it is read once per format and once for scoring)")
    if not callable(forward_step):
        raise TypeError(f"forward_step={forward_step!r}: expected a callable forward_step(model, batch) -> output")
    if method == "gradient" and not callable(loss_func):
        raise TypeError(f"loss_func={loss_func!r}: method='gradient' needs a callable loss_func(output, batch) -> "
                        "scalar loss (or use method='kl_div', which needs none)")
    for name, value in (("num_calib_steps", num_calib_steps), ("num_score_steps", num_score_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: expected a positive int")
