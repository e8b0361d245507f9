"""HQQ (Badri & Shaji 2023, half-quadratic quantization): data-free fit of each group's integer grid by
minimising an l_p (p < 1) norm of the weight error, which tolerates a few large errors (outliers) in
exchange for small ones everywhere else.

For one group ``w`` (``g`` weights) on an integer grid with step ``d`` and zero point ``z`` (``z = 0``
symmetric), the problem ``min_{d,z} ||w - d (c - z)||_p^p`` with codes ``c = clamp(round(w / d + z))`` is
split with an auxiliary error ``e`` (half-quadratic splitting, penalty ``beta``)::

    min  ||e||_p^p + beta/2 ||e - (w - d (c - z))||_2^2

and solved by alternating, ``iterations`` times:

1. codes ``c = clamp(round(w / d + z), qmin, qmax)`` and ``w_r = d (c - z)``;
2. the proximal step of the l_p norm (generalised soft thresholding)::

       e = sign(w - w_r) * relu(|w - w_r| - |w - w_r|^(p - 1) / beta)

3. the grid in closed form against the target ``t = w - e`` (the part of ``w`` the grid should carry):
   asymmetric ``z = clamp(round(mean(c - t / d)), 0, qmax)`` (HQQ's zero update, rounded to an integer zero
   point because lowbit's asymmetric format stores one), then ``d = <c - z, t> / <c - z, c - z>`` (least
   squares; HQQ keeps ``d`` fixed, here it is the one continuous variable left); symmetric only the ``d`` step;
4. ``beta *= kappa``.

Every group keeps the grid with the smallest ``sum |w - w_r|`` seen (HQQ's own stopping criterion), the
min/max start included, so the result is never worse than round-to-nearest by that measure. The grid is
stored as the quantizer's range (``scale_estimation.store_range``); codes always come from the format's
own rounding (``lowbit.formats``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lowbit import formats
from lowbit.algorithms.scale_estimation import IntGrid, estimation_group_size, quantizer_range, store_range
from lowbit.calibration import max_calibrate
from lowbit.structure.groups import row_weights
from lowbit.structure.weights import QuantizableWeight

HQQ_OPTIONS = {"iterations": 20, "lp_norm": 0.7, "beta": 10.0, "kappa": 1.01}


def shrink_lp(x: Tensor, beta: float, p: float) -> Tensor:
    """The proximal operator of ``|.|^p / beta`` (HQQ's generalised soft threshold), elementwise:
    ``sign(x) * relu(|x| - |x|^(p - 1) / beta)``; 0 where ``x`` is 0."""
    magnitude = x.abs()
    threshold = magnitude.clamp_min(torch.finfo(x.dtype).tiny).pow(p - 1) / beta
    return torch.sign(x) * torch.relu(magnitude - threshold)


def grid_of(grid: IntGrid, amin: Tensor | None, amax: Tensor) -> tuple[Tensor, Tensor]:
    """``(step d, zero point z)`` of a stored range, as the format computes them (``z = 0`` symmetric)."""
    if grid.asymmetric:
        low, high = amin.clamp(max=0), amax.clamp(min=0)
        step = ((high - low) / grid.qmax).clamp_min(torch.finfo(amax.dtype).tiny)
        return step, torch.clamp(torch.round(-low / step), 0, grid.qmax)
    return (amax / grid.qmax).clamp_min(torch.finfo(amax.dtype).tiny), torch.zeros_like(amax)


def range_of(grid: IntGrid, step: Tensor, zero: Tensor) -> tuple[Tensor | None, Tensor]:
    """The stored range of a grid: asymmetric ``(-z d, (qmax - z) d)``, symmetric ``(None, qmax d)``."""
    if grid.asymmetric:
        return -zero * step, (grid.qmax - zero) * step
    return None, grid.qmax * step


def hqq_step(grid: IntGrid, w: Tensor, step: Tensor, zero: Tensor, beta: float, p: float
             ) -> tuple[Tensor, Tensor]:
    """One HQQ iteration (steps 1-3 of the module docstring) on groups ``w`` ``(..., g)`` with ``step``,
    ``zero`` ``(..., 1)``; returns the new ``(step, zero)``."""
    qmin = formats.int_range(grid.num_bits, grid.asymmetric or grid.unsigned, grid.narrow_range)[0]
    codes = torch.clamp(torch.round(w / step + zero), qmin, grid.qmax)
    error = shrink_lp(w - step * (codes - zero), beta, p)
    target = w - error
    if grid.asymmetric:
        zero = torch.clamp(torch.round((codes - target / step).mean(-1, keepdim=True)), 0, grid.qmax)
    shifted = codes - zero
    energy = shifted.square().sum(-1, keepdim=True)
    fitted = (shifted * target).sum(-1, keepdim=True) / energy.clamp_min(torch.finfo(w.dtype).tiny)
    step = torch.where((energy > 0) & (fitted > 0), fitted, step)
    return step, zero


def hqq_grid(grid: IntGrid, groups: Tensor, start: tuple[Tensor | None, Tensor], iterations: int = 20,
             lp_norm: float = 0.7, beta: float = 10.0, kappa: float = 1.01) -> tuple[Tensor | None, Tensor, Tensor]:
    """HQQ on ``groups`` ``(..., g)`` from the range ``start`` (``(amin or None, amax)``, ``(..., 1)``);
    returns the best range per group and its ``sum |w - w_r|`` ``(...)``. Computed in ``groups``' dtype."""
    step, zero = grid_of(grid, *start)
    best_range = start
    best_error = (groups - grid.fake_quant(groups, *start)).abs().sum(-1)
    for _ in range(iterations):
        step, zero = hqq_step(grid, groups, step, zero, beta, lp_norm)
        candidate = range_of(grid, step, zero)
        error = (groups - grid.fake_quant(groups, *candidate)).abs().sum(-1).nan_to_num(nan=float("inf"))
        better = (error < best_error).unsqueeze(-1)
        best_range = tuple(None if old is None else torch.where(better, new, old)
                           for old, new in zip(best_range, candidate, strict=True))
        best_error = torch.minimum(error, best_error)
        beta *= kappa
    return best_range[0], best_range[1], best_error


def hqq_linear_range(linear: QuantizableWeight, name: str, hessian: Tensor | None = None, **options) -> float:
    """HQQ of one linear's (static integer) weight quantizer from its current range; stores the range and
    returns the summed ``|w - w_r|``. ``hessian`` is unused (HQQ is data-free): the signature of a
    ``gptq.RangeEstimator``, so GPTQ can keep HQQ's grid as its fixed groups."""
    options = {**HQQ_OPTIONS, **options}
    quantizer = linear.weight_quantizer
    group_size = estimation_group_size(linear, name)
    weight = linear.weight.detach().float()
    groups = weight.reshape(weight.shape[0], -1, group_size)
    amin, amax, error = hqq_grid(IntGrid.of(quantizer), groups, quantizer_range(quantizer, weight, group_size),
                                 **options)
    store_range(quantizer, weight, amin, amax)
    return float(error.sum())


def check_hqq_options(options: dict) -> None:
    """ValueError naming the option unless iterations >= 0, 0 < lp_norm <= 1, beta > 0, kappa >= 1."""
    checks = {"iterations": options["iterations"] >= 0, "lp_norm": 0 < options["lp_norm"] <= 1,
              "beta": options["beta"] > 0, "kappa": options["kappa"] >= 1}
    allowed = {"iterations": "an int >= 0", "lp_norm": "in (0, 1]", "beta": "> 0", "kappa": ">= 1"}
    for key, ok in checks.items():
        if not ok:
            raise ValueError(f"hqq: {key}={options[key]!r} must be {allowed[key]}")


def hqq_weights(model: nn.Module) -> dict[str, QuantizableWeight]:
    """Every weight of ``model`` with an enabled weight quantizer, checked to be one HQQ can fit (a static
    integer grid per channel or per group): ValueError naming the first that is not, before any changes."""
    weights = {name: weight for name, weight in row_weights(model).items() if weight.weight_quantizer.is_enabled}
    for name, weight in weights.items():
        estimation_group_size(weight, f"{name}.weight_quantizer")
    return weights


def hqq(model: nn.Module, forward_loop=None, **options) -> None:
    """Max calibration (activations need ``forward_loop`` if static), then HQQ on every enabled weight
    quantizer; the weights themselves are not changed."""
    weights = hqq_weights(model)
    max_calibrate(model, forward_loop)
    for name, weight in weights.items():
        hqq_linear_range(weight, name, **options)
