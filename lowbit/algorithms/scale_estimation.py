"""Scale estimation: per weight group, the integer grid (step, and zero point when asymmetric) that
minimises the layer's output error on real calibration inputs (the idea of NNCF's scale estimation).

For one linear ``y = x W^T`` and a group ``G`` of ``g`` input columns, the group's share of the output
error when its weights ``w`` (one row) become ``w_hat`` is ``e(w_hat) = (w - w_hat)^T H_G (w - w_hat)``
with ``H_G`` the ``g x g`` diagonal block of ``H = X^T X / n`` (cross-group terms are ignored).
``objective="diagonal"`` keeps only ``diag(H_G) = E[x_j^2]`` (the per-channel activation energy).

The grid: symmetric ``w_hat = d * q`` with integer codes ``q`` in the format's range and ``amax = d * qmax``;
asymmetric ``w_hat = d * (c - z)``, ``c`` in ``[0, 2**b - 1]``, integer zero point ``z`` in that range, stored
as ``amin = -z d``, ``amax = (2**b - 1 - z) d`` (the asymmetric formula maps these back to ``d`` and ``z``);
signed-scale symmetric ``w_hat = d * q`` with ``d`` of either sign, stored as the grid's ends
``sorted(qmin d, qmax d)`` (``formats.signed_scale_range``).
Codes always come from the format's own rounding (``lowbit.formats``).

With codes fixed, the best grid is a weighted least-squares fit, in closed form per group:

- symmetric: ``d = <w, q>_H / <q, q>_H`` where ``<a, b>_H = a^T H_G b``;
- asymmetric: ``w ~ d c + b`` (2 unknowns, 2x2 normal equations), then ``z = clamp(round(-b / d))`` and
  ``d = <w, c - z>_H / <c - z, c - z>_H`` with ``z`` fixed.

From each start point (the quantizer's current range, and ``r * [min, max]`` of the group for every ``r``
in ``ratios``) the search alternates re-rounding and re-fitting ``steps`` times (asymmetric: the fitted
zero point and its neighbours are tried, the best continues). Every range visited is
scored by its exact error ``e`` (re-rounded) and each group keeps its best: the current range is a
candidate, so the error never grows. Ties keep the earlier candidate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit import formats
from lowbit.algorithms.weights import shrink_ratios, weight_group_size
from lowbit.quantizer import TensorQuantizer
from lowbit.structure.weights import QuantizableWeight

OBJECTIVES = ("block", "diagonal")
TINY = torch.finfo(torch.float32).tiny
CHUNK_ELEMENTS = 2**19  # (starts x weight) elements searched side by side: tensors stay in cache


@dataclass(frozen=True)
class IntGrid:
    """The integer format of a weight quantizer: ``num_bits``, and symmetric (signed codes) or asymmetric."""

    num_bits: int
    asymmetric: bool = False
    unsigned: bool = False
    narrow_range: bool = False
    signed_scale: bool = False

    @classmethod
    def of(cls, quantizer: TensorQuantizer) -> IntGrid:
        config = quantizer.config
        return cls(config.num_bits, config.asymmetric, config.unsigned, config.narrow_range, config.signed_scale)

    @property
    def keeps_amin(self) -> bool:
        """The range is ``(amin, amax)`` (asymmetric, signed-scale), else ``(None, amax)``."""
        return self.asymmetric or self.signed_scale

    @property
    def qmax(self) -> int:
        """Largest code: ``2**b - 1`` asymmetric, else the signed/unsigned range's maximum."""
        unsigned = self.asymmetric or self.unsigned
        return formats.int_range(self.num_bits, unsigned=unsigned, narrow_range=self.narrow_range)[1]

    def quantize(self, w: Tensor, amin: Tensor | None, amax: Tensor) -> tuple[Tensor, Tensor]:
        """``(codes, fake_quant)`` of ``w`` from one rounding (ranges broadcast with ``w``), both in ``w``'s
        dtype. Codes: symmetric the signed ``q``, asymmetric the unsigned ``c``."""
        if self.asymmetric:
            codes, scale, zero_point = formats.quantize_int_asym(w, amin, amax, self.num_bits)
            return codes.to(w.dtype), formats.dequantize_int_asym(codes, scale, zero_point, w.dtype)
        if self.signed_scale:
            codes, scale = formats.quantize_int_signed_scale(w, amin, amax, self.num_bits)
        else:
            codes, scale = formats.quantize_int(w, amax, self.num_bits, self.unsigned, self.narrow_range)
        return codes.to(w.dtype), formats.dequantize_int(codes, scale, w.dtype)

    def codes(self, w: Tensor, amin: Tensor | None, amax: Tensor) -> Tensor:
        return self.quantize(w, amin, amax)[0]

    def fake_quant(self, w: Tensor, amin: Tensor | None, amax: Tensor) -> Tensor:
        return self.quantize(w, amin, amax)[1]

    def own_range(self, w: Tensor) -> tuple[Tensor | None, Tensor]:
        """``(min, max)`` of each group (last dim) if asymmetric or signed-scale, else ``(None, max |w|)``; keepdim."""
        if self.keeps_amin:
            return w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
        return None, w.abs().amax(dim=-1, keepdim=True)


def hessian_product(a: Tensor, hessian: Tensor) -> Tensor:
    """``a^T H_G`` for every vector of ``a`` ``(n, ..., g)`` (groups first) and its group's block of
    ``hessian`` ``(n, g, g)``; ``a``'s shape, one batched matmul (no permuted copies)."""
    groups, size = hessian.shape[0], hessian.shape[-1]
    return torch.bmm(a.reshape(groups, -1, size), hessian).reshape(a.shape)


def group_error(w: Tensor, w_hat: Tensor, hessian: Tensor) -> Tensor:
    """``(w - w_hat)^T H_G (w - w_hat)`` per vector, groups first: ``w``, ``w_hat`` ``(n, ..., g)``
    (broadcast), ``hessian`` ``(n, g, g)`` -> the broadcast shape without ``g``; NaN counts as inf."""
    delta = w - w_hat
    return (hessian_product(delta, hessian) * delta).sum(dim=-1).nan_to_num(nan=float("inf"))


def refit(grid: IntGrid, w: Tensor, hessian: Tensor, amin: Tensor | None, amax: Tensor,
          codes: Tensor | None = None) -> list[tuple[Tensor | None, Tensor]]:
    """The least-squares grids for the codes of ``(amin, amax)`` (module docstring), groups first: ``w``
    ``(n, ..., g)``, ``hessian`` ``(n, g, g)``, ranges ``(n, ..., 1)`` (broadcast with ``w``); the
    candidates have the ranges' broadcast shape. ``codes``: ``grid.codes(w, amin, amax)`` if already known.

    Symmetric: one candidate. Asymmetric: three, the fitted zero point and its two neighbours with the
    same step (the rounded zero point of the joint fit is often one step off). Groups where a fit is degenerate (no
    nonzero code, a non-positive step) keep their range. ``<a, b>_H`` is the sum of ``(a H_G) * b``, the
    products of ``w``, ``1`` and the codes each computed once.
    """
    if codes is None:
        codes = grid.codes(w, amin, amax)
    codes_h, w_h = hessian_product(codes, hessian), hessian_product(w, hessian)
    if not grid.asymmetric:
        step = (w_h * codes).sum(dim=-1) / (codes_h * codes).sum(dim=-1)
        if grid.signed_scale:
            step = step[..., None]
            valid = step.isfinite() & (step.abs() > TINY)
            low, high = formats.signed_scale_range(torch.where(valid, step, 1.0), grid.num_bits)
            return [(torch.where(valid, low, amin), torch.where(valid, high, amax))]
        fitted = (step * grid.qmax)[..., None]
        return [(None, torch.where(fitted.isfinite() & (fitted > 0), fitted, amax))]
    ones_h = hessian_product(torch.ones_like(w), hessian)
    cc, c1, one1 = (codes_h * codes).sum(dim=-1), codes_h.sum(dim=-1), ones_h.sum(dim=-1)
    cw, onew = (codes_h * w).sum(dim=-1), (ones_h * w).sum(dim=-1)
    determinant = cc * one1 - c1 * c1
    step = (cw * one1 - c1 * onew) / determinant
    offset = (cc * onew - c1 * cw) / determinant
    zero_point = torch.clamp(torch.round(-offset / step).nan_to_num(0.0), 0, grid.qmax)[..., None]
    centred = codes - zero_point
    centred_h = hessian_product(centred, hessian)
    step = ((w_h * centred).sum(dim=-1) / (centred_h * centred).sum(dim=-1))[..., None]
    valid = step.isfinite() & (step > TINY)
    candidates = []
    for shift in (0, -1, 1):  # the neighbours keep the step; the next refit re-rounds
        shifted = torch.clamp(zero_point + shift, 0, grid.qmax)
        candidates.append((torch.where(valid, -shifted * step, amin),
                           torch.where(valid, (grid.qmax - shifted) * step, amax)))
    return candidates


def estimate_range(
    grid: IntGrid,
    w: Tensor,
    hessian: Tensor,
    start: tuple[Tensor | None, Tensor],
    ratios: list[float],
    steps: int,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """The search of the module docstring for weight groups ``w`` ``(rows, n, g)`` with ``hessian``
    ``(n, g, g)`` and the current range ``start`` = ``(amin or None, amax)``, each ``(rows, n, 1)``.

    Each step continues from the best candidate of the previous refit, per group. The start points are
    searched side by side, up to ``CHUNK_ELEMENTS // w.numel()`` at a time (a leading start axis, groups
    first inside: ``(n, starts, rows, g)``), and the first least error wins, in the order of the
    sequential search. Returns ``(amin or None, amax, error)``: the best range per group and its error
    ``(rows, n)``; float32 (float64 when ``w`` is float64; ``start`` is cast to it).
    """
    hessian = hessian.to(w.dtype)
    own_min, own_max = grid.own_range(w)
    starts = [tuple(None if bound is None else bound.to(w.dtype) for bound in start)]
    starts += [(None if own_min is None else own_min * r, own_max * r) for r in ratios]
    groups = w.transpose(0, 1).unsqueeze(1).contiguous()  # (n, 1, rows, g)
    per_chunk = max(1, CHUNK_ELEMENTS // max(1, w.numel()))
    best = None
    for first in range(0, len(starts), per_chunk):
        chunk = starts[first : first + per_chunk]
        bounds = tuple(None if chunk[0][i] is None else torch.stack([s[i] for s in chunk]).permute(2, 0, 1, 3)
                       for i in range(2))  # (n, starts, rows, 1)
        chains = _search(grid, groups, hessian, bounds, steps)
        winner = chains.error.argmin(dim=1, keepdim=True)  # the first least error over the starts
        error = chains.error.gather(1, winner)
        chosen = tuple(None if bound is None else bound.gather(1, winner[..., None]) for bound in chains.range)
        if best is None:
            best = _Best(chosen, error)
        else:
            best.update(chosen, error)
    amin, amax = (None if bound is None else bound[:, 0].transpose(0, 1) for bound in best.range)
    return amin, amax, best.error[:, 0].transpose(0, 1)


def _search(grid: IntGrid, groups: Tensor, hessian: Tensor, bounds: tuple[Tensor | None, Tensor],
            steps: int) -> _Best:
    """Per start point (``bounds`` ``(n, starts, rows, 1)``, ``groups`` ``(n, 1, rows, g)``): the start, then
    ``steps`` refits, each from the best candidate of the one before; the first least error of them all."""
    codes, w_hat = grid.quantize(groups, *bounds)
    chain = _Best(bounds, group_error(groups, w_hat, hessian), codes)
    best = _Best(chain.range, chain.error)
    for _ in range(steps):
        candidates = refit(grid, groups, hessian, *chain.range, codes=chain.codes)
        chain = None
        for candidate in candidates:
            codes, w_hat = grid.quantize(groups, *candidate)
            error = group_error(groups, w_hat, hessian)
            if chain is None:
                chain = _Best(candidate, error, codes)
            else:
                chain.update(candidate, error, codes)
        best.update(chain.range, chain.error)
    return best


class _Best:
    """Per group, the range with the least error seen so far (ties keep the earlier), and its codes when
    they are tracked."""

    def __init__(self, bounds: tuple[Tensor | None, Tensor], error: Tensor, codes: Tensor | None = None) -> None:
        self.range, self.error, self.codes = bounds, error, codes

    def update(self, bounds: tuple[Tensor | None, Tensor], error: Tensor, codes: Tensor | None = None) -> None:
        better = error < self.error
        self.error = torch.where(better, error, self.error)
        self.range = tuple(None if old is None else torch.where(better[..., None], new, old)
                           for old, new in zip(self.range, bounds, strict=True))
        if codes is not None:
            self.codes = torch.where(better[..., None], codes, self.codes)


def hessian_blocks(hessian: Tensor, group_size: int, objective: str = "block") -> Tensor:
    """The ``(n, g, g)`` diagonal blocks of ``hessian`` ``(in, in)``; ``"diagonal"`` keeps their diagonals."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r}: allowed are {list(OBJECTIVES)}")
    groups = hessian.shape[0] // group_size
    blocks = hessian.reshape(groups, group_size, groups, group_size).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    return torch.diag_embed(blocks.diagonal(dim1=-2, dim2=-1)) if objective == "diagonal" else blocks


# ---- the weight quantizer as an integer grid ---------------------------------------------------------------


def estimation_group_size(linear: QuantizableWeight, name: str) -> int:
    """Columns sharing one scale; ValueError unless the weight quantizer is a static integer one with
    per-channel (axis=0) or ``block_sizes={-1: g}`` scales, symmetric or asymmetric."""
    quantizer = linear.weight_quantizer
    config = getattr(quantizer, "config", None)
    if config is None or config.is_float or config.is_dynamic or config.block_scale_bits is not None:
        label = type(quantizer).__name__ if config is None else f"{config.format_name} {config.granularity}"
        raise ValueError(f"{name}: scale estimation needs a static integer weight quantizer, got {label}")
    return weight_group_size(linear, name, per_row=True, asymmetric=True)


def quantizer_range(quantizer: TensorQuantizer, weight: Tensor, group_size: int) -> tuple[Tensor | None, Tensor]:
    """The quantizer's stored ``(amin or None, amax)`` as ``(out, n, 1)``, or the weight's own range if unset."""
    grid = IntGrid.of(quantizer)
    groups = weight.detach().float().reshape(weight.shape[0], -1, group_size)
    if quantizer.amax is None or (grid.keeps_amin and quantizer.amin is None):
        return grid.own_range(groups)
    amin = None if not grid.keeps_amin else quantizer.amin.float().reshape(*groups.shape[:2], 1)
    return amin, quantizer.amax.detach().float().reshape(*groups.shape[:2], 1)


def store_range(quantizer: TensorQuantizer, weight: Tensor, amin: Tensor | None, amax: Tensor) -> None:
    """Set the quantizer's static ``amax`` (and ``amin``), reshaped to what its calibration gives."""
    shape = quantizer.compute_amax(weight).shape
    quantizer.amax = amax.detach().float().reshape(shape).contiguous()
    if amin is not None:
        quantizer.amin = amin.detach().float().reshape(shape).contiguous()


def estimate_linear_range(linear: QuantizableWeight, name: str, hessian: Tensor, ratios: list[float], steps: int,
                          objective: str) -> float:
    """Scale estimation of one linear's weight quantizer against ``hessian`` ``(in, in)`` of its input;
    stores the range and returns the summed error ``sum e`` of the result."""
    quantizer = linear.weight_quantizer
    group_size = estimation_group_size(linear, name)
    weight = linear.weight.detach().float()
    groups = weight.reshape(weight.shape[0], -1, group_size)
    amin, amax, error = estimate_range(IntGrid.of(quantizer), groups, hessian_blocks(hessian, group_size, objective),
                                       quantizer_range(quantizer, weight, group_size), ratios, steps)
    store_range(quantizer, weight, amin, amax)
    return float(error.sum())


def start_ratios(min_ratio: float, ratio_step: float) -> list[float]:
    """``1, 1 - step, ...`` down to ``min_ratio``: the shrunk ranges the search starts from."""
    return shrink_ratios(min_ratio, ratio_step, "min_ratio", "ratio_step")


def check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps={steps!r} must be an int >= 0 (refits per start point)")
    return steps
