"""GPTQ (Frantar et al. 2022; IST-DASLab ``gptq.py``): quantize a weight column by column, pushing each
column's rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the
layer's reconstruction loss ``||X W^T - X Q^T||^2``.

The math (``W``: ``(out, in)``; ``X``: ``(n, in)`` inputs of the layer):

1. ``H = 2 X^T X / n`` (accumulated over batches, :class:`HessianAccumulator`);
2. dead inputs (``H_jj = 0``): ``H_jj = 1`` and ``W[:, j] = 0``;
3. damping ``H += percdamp * mean(diag H) * I``, multiplied by 10 and retried while Cholesky fails;
4. ``U = cholesky(H^-1, upper=True)``;
5. for each column ``j``: ``q_j = quantize(w_j)``, ``e_j = (w_j - q_j) / U_jj``,
   ``W[:, k] -= e_j * U_jk`` for ``k > j`` (done lazily in blocks of ``block_size`` columns).

Scales are per group of ``group_size`` columns, computed from the *current* (error-updated) weights
when the loop reaches the group's first column, or from the original weights up front with
``static_groups``. ``act_order`` visits columns by decreasing ``H_jj``; with groups it needs
``static_groups`` so that a group stays a contiguous slab of the original columns.

The format is not known here: ``group_amax(slab)`` and ``quantize_column(column, amax)`` come from the
caller (for a model: the weight quantizer's ``compute_amax`` and ``fake_quant``; for an asymmetric
quantizer the "amax" of a group is ``stack([amin, amax])``). ``fixed_groups`` gives every group's grid
up front instead (e.g. found by ``lowbit.algorithms.scale_estimation``): GPTQ then only chooses the codes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lowbit import distributed
from lowbit.algorithms.gptq_micro import MicroScaleGrid, is_micro_scaled, micro_block_size
from lowbit.algorithms.gptq_target import input_error_target, linears_with_input_error
from lowbit.algorithms.layerwise import LayerInputs, weights_reused
from lowbit.algorithms.scale_estimation import IntGrid, estimation_group_size, quantizer_range, store_range
from lowbit.algorithms.weights import effective_input, quantize_column, set_weight_amax, weight_group_size
from lowbit.quantizer import TensorQuantizer
from lowbit.structure.groups import find_input_groups
from lowbit.structure.weights import QuantizableWeight

GroupAmax = Callable[[Tensor], Tensor]  # (out, group_size) slab -> amax for that group
GroupChooser = Callable[[Tensor, Tensor], Tensor]  # (slab, the group's (g, g) block of U) -> amax for that group
ColumnQuantizer = Callable[[Tensor, Tensor], Tensor]  # (column (out,), group amax) -> quantized column
DAMPING_RETRIES = 6


class HessianAccumulator:
    """``H = 2 X^T X / n`` over the rows of every batch added (rows = all leading dims): each batch's ``X_b^T X_b``
    in float32, their sum kept in float64 (``gram``), so that ``H`` (float32) does not depend on the order in
    which the batches came, nor on how they were split over ranks (``lowbit.distributed``): one rounding
    flip in ``H`` can change GPTQ's codes from that column on."""

    def __init__(self, columns: int, device: torch.device | str | None = None) -> None:
        self.gram = torch.zeros(columns, columns, dtype=torch.float64, device=device)
        self.rows = 0

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if x.shape[1] != self.gram.shape[0]:
            raise ValueError(f"input has {x.shape[1]} columns, the Hessian {self.gram.shape[0]}")
        self.gram += (x.T @ x).double()
        self.rows += x.shape[0]

    def combine_ranks(self) -> None:
        """Sum ``gram`` and ``rows`` over ranks (inside ``lowbit.distributed.calibrating_across``)."""
        self.gram, self.rows = distributed.sum_tensor(self.gram), distributed.sum_count(self.rows)

    @property
    def hessian(self) -> Tensor:
        return (self.gram * (2.0 / max(self.rows, 1))).float()


@dataclass
class GptqResult:
    weight: Tensor  # (out, in), quantize-dequantized, original column order
    group_amax: list[Tensor]  # the amax of each group, in column order of the groups
    loss: float  # sum over columns of (w - q)^2 / U_jj^2 / 2, GPTQ's estimate of the added loss


def damped_inverse_cholesky(hessian: Tensor, percdamp: float) -> Tensor:
    """``cholesky((H + d I)^-1, upper=True)`` with ``d = percdamp * mean(diag H)``, d *= 10 on failure."""
    damp = percdamp * hessian.diagonal().mean()
    identity = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for _ in range(DAMPING_RETRIES):
        lower, info = torch.linalg.cholesky_ex(hessian + damp * identity)
        if info == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0:
                return upper
        damp = damp * 10
    raise RuntimeError(
        f"GPTQ: the Hessian is not positive definite even with damping {float(damp) / 10:.3g} "
        f"(percdamp={percdamp}, {DAMPING_RETRIES} tries); the calibration inputs may be degenerate"
    )


def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    group_amax: GroupAmax,
    quantize_column: ColumnQuantizer,
    group_size: int | None = None,
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    fixed_groups: list[Tensor] | None = None,
    choose_group: GroupChooser | None = None,
) -> GptqResult:
    """GPTQ of ``weight`` ``(out, in)`` with Hessian ``hessian`` ``(in, in)`` (see the module docstring).

    ``group_size`` (None = all ``in`` columns) must divide ``in``; ``block_size`` is rounded down to a
    multiple of it (at least one group) so a group never straddles a lazy-update block. ``fixed_groups``
    (one entry per group, in column order) implies static groups. Computes in float32, or float64 when
    ``weight`` is float64. Neither input is modified. ``choose_group`` (dynamic groups only) replaces
    ``group_amax`` at each group's first column and also gets the group's ``(g, g)`` block of ``U``, so that a
    grid can be chosen by GPTQ's own loss over the group (``gptq_micro``'s ``block_scales="loss"``).
    """
    out_features, columns = weight.shape
    group_size = columns if group_size is None else group_size
    static_groups = static_groups or fixed_groups is not None
    _check_options(hessian, columns, group_size, block_size, percdamp, act_order, static_groups)
    if fixed_groups is not None and len(fixed_groups) != columns // group_size:
        raise ValueError(f"fixed_groups has {len(fixed_groups)} entries, expected {columns // group_size} groups")
    if choose_group is not None and static_groups:
        raise ValueError("choose_group picks a group's grid from its current weights: it needs dynamic groups "
                         "(static_groups=False, no fixed_groups)")
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(dtype).clone()
    h = hessian.detach().to(dtype).clone()

    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    if fixed_groups is not None:
        groups = list(fixed_groups)
    elif static_groups:
        groups = [group_amax(w[:, g : g + group_size]) for g in range(0, columns, group_size)]
    else:
        groups = []
    order = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(columns, device=w.device)
    w, h = w[:, order], h[order][:, order]
    upper = damped_inverse_cholesky(h, percdamp)

    quantized = torch.zeros_like(w)
    loss = torch.zeros((), dtype=dtype, device=w.device)
    group_of = [column // group_size for column in order.tolist()]  # original column -> its group
    if group_size < columns:
        block_size = max(group_size, block_size // group_size * group_size)
    for start in range(0, columns, block_size):
        stop = min(start + block_size, columns)
        block = w[:, start:stop].clone()
        errors = torch.zeros_like(block)
        for i in range(stop - start):
            column = start + i
            if not static_groups and column % group_size == 0:
                # the group's current weights: all of them are in this block (or, for one group, in w)
                slab = block[:, i : i + group_size] if group_size < columns else w
                groups.append(group_amax(slab) if choose_group is None else
                              choose_group(slab, upper[column : column + group_size, column : column + group_size]))
            q = quantize_column(block[:, i], groups[group_of[column]])
            error = (block[:, i] - q) / upper[column, column]
            block[:, i:] -= error[:, None] * upper[column, column:stop][None, :]
            quantized[:, column] = q
            errors[:, i] = error
            loss += error.square().sum() / 2
        w[:, stop:] -= errors @ upper[start:stop, stop:]

    return GptqResult(quantized[:, torch.argsort(order)], groups, float(loss))


def _check_options(hessian, columns, group_size, block_size, percdamp, act_order, static_groups) -> None:
    if hessian.shape != (columns, columns):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}, expected ({columns}, {columns})")
    if not isinstance(group_size, int) or group_size < 1 or columns % group_size:
        raise ValueError(f"group_size={group_size!r} must be a positive int dividing in_features={columns}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} must be a positive int")
    if not percdamp > 0:
        raise ValueError(f"percdamp={percdamp!r} must be > 0 (the damping is multiplied by 10 on failure)")
    if act_order and group_size < columns and not static_groups:
        raise ValueError(
            "act_order=True with group-wise scales needs static_groups=True, so that each group stays a "
            "contiguous slab of the original columns (the formats have no per-column group index)"
        )


# ---- layer pass ---------------------------------------------------------------------------------------

RangeEstimator = Callable[[QuantizableWeight, str, Tensor], None]  # (linear, name, its input Hessian): sets its range


def linears_with_hessians(layer: nn.Module, inputs: LayerInputs) -> Iterator[tuple[str, QuantizableWeight, Tensor]]:
    """``(name, linear, H)`` for every linear with an enabled weight quantizer in ``layer``, one input group
    at a time: the group's Hessian ``input_hessian`` is accumulated over all batches after the previous
    groups were processed (so later groups see their already quantized outputs), and freed after it."""
    for group in find_input_groups(layer, inputs):
        linears = {n: w for n, w in group.linears.items() if w.weight_quantizer.is_enabled}
        if not linears:
            continue
        hessian = input_hessian(layer, inputs, *next(iter(group.linears.items())))
        for name, linear in linears.items():
            yield name, linear, hessian
        del hessian


def gptq_layer(layer: nn.Module, inputs: LayerInputs, block_size: int = 128, percdamp: float = 0.01,
               act_order: bool = False, static_groups: bool = False,
               estimate_range: RangeEstimator | None = None, block_scales: str = "max",
               input_error: bool = False) -> list[tuple[str, float]]:
    """GPTQ every linear with an enabled weight quantizer in ``layer`` (``linears_with_hessians``), replacing
    its weight; each weight quantizer gets the grid GPTQ used. With ``estimate_range`` (e.g. scale
    estimation), that sets the quantizer's range from the Hessian first, and GPTQ keeps it as the fixed
    grid of every group. Symmetric and asymmetric integer grids, and NVFP4 / MX weights (``gptq_micro``: each
    block's scale chosen by ``block_scales`` when the loop reaches it). With ``input_error`` (``gptq_target``),
    GPTQ rounds the least-squares weight for the quantized inputs with their Hessian. Returns (name, loss).
    """
    losses = []
    if input_error:
        found = linears_with_input_error(layer, inputs)
    else:
        found = ((name, linear, hessian, None) for name, linear, hessian in linears_with_hessians(layer, inputs))
    for name, linear, hessian, cross in found:
        quantizer = linear.weight_quantizer
        weight = linear.weight.detach() if cross is None else input_error_target(linear.weight, hessian, cross,
                                                                                 percdamp)
        if is_micro_scaled(quantizer):
            losses.append((name, _gptq_micro_scaled(linear, name, weight, hessian, block_scales,
                                                    block_size=block_size, percdamp=percdamp, act_order=act_order,
                                                    static_groups=static_groups)))
            continue
        group_size = gptq_group_size(linear, name)
        fixed = None
        if estimate_range is not None:
            estimate_range(linear, name, hessian)
            fixed = _stored_groups(quantizer, linear.weight, group_size)
        result = gptq_quantize(
            weight,
            hessian,
            group_amax=lambda slab, q=quantizer: _group_range(q, slab),
            quantize_column=lambda column, grid, q=quantizer: _quantize_column(q, column, grid),
            group_size=group_size,
            block_size=block_size,
            percdamp=percdamp,
            act_order=act_order,
            static_groups=static_groups,
            fixed_groups=fixed,
        )
        with torch.no_grad():
            linear.weight.copy_(result.weight)
        grids = result.group_amax[0] if len(result.group_amax) == 1 else torch.cat(result.group_amax, dim=-2)
        if grids.dim() == 4:  # asymmetric: stack([amin, amax])
            store_range(quantizer, linear.weight, grids[0], grids[1])
        else:
            set_weight_amax(quantizer, linear.weight, grids)
        losses.append((name, result.loss))
    return losses


def _gptq_micro_scaled(linear: QuantizableWeight, name: str, weight: Tensor, hessian: Tensor, block_scales: str,
                       **options) -> float:
    """GPTQ of ``weight`` (the linear's, or its ``gptq_target``) on the linear's NVFP4 / MX grid (``gptq_micro``):
    the linear's weight replaced, block maxima stored; returns the loss."""
    quantizer = linear.weight_quantizer
    grid = MicroScaleGrid.of(quantizer, weight, micro_block_size(linear, name, block_scales), block_scales)
    result = gptq_quantize(weight, hessian, grid.block_amax, grid.quantize_column,
                           group_size=grid.block_size,
                           choose_group=grid.block_amax_by_loss if block_scales == "loss" else None, **options)
    with torch.no_grad():
        linear.weight.copy_(result.weight)
    grid.store(quantizer, linear.weight, result.group_amax)
    return result.loss


def gptq_group_size(linear: QuantizableWeight, name: str) -> int:
    """Columns sharing one grid; ValueError if GPTQ cannot handle the weight quantizer (``weights`` module,
    plus asymmetric integers as ``scale_estimation.estimation_group_size`` allows them, and NVFP4 / MX blocks)."""
    if is_micro_scaled(linear.weight_quantizer):
        return micro_block_size(linear, name)
    if getattr(getattr(linear.weight_quantizer, "config", None), "keeps_amin", False):
        return estimation_group_size(linear, name)
    return weight_group_size(linear, name)


def _group_range(quantizer: TensorQuantizer, slab: Tensor) -> Tensor:
    """The group's grid from its weights ``(out, g)``: ``amax`` as ``compute_amax`` gives it, or for an
    asymmetric or signed-scale quantizer ``stack([min, max])`` of that shape."""
    if not quantizer.config.keeps_amin:
        return quantizer.compute_amax(slab)
    amin, amax = IntGrid.of(quantizer).own_range(slab.float()[:, None, :])
    return torch.stack([amin, amax])


def _stored_groups(quantizer: TensorQuantizer, weight: Tensor, group_size: int) -> list[Tensor]:
    """The quantizer's stored grid, one ``_group_range``-shaped entry per group."""
    amin, amax = quantizer_range(quantizer, weight, group_size)
    grids = amax if amin is None else torch.stack([amin, amax])
    return [grids[..., k : k + 1, :] for k in range(grids.shape[-2])]


def _quantize_column(quantizer: TensorQuantizer, column: Tensor, grid: Tensor) -> Tensor:
    if not quantizer.config.keeps_amin:
        return quantize_column(quantizer, column, grid)
    amin, amax = grid.reshape(2, -1, 1)
    return IntGrid.of(quantizer).fake_quant(column[:, None], amin, amax)[:, 0]


def input_hessian(layer: nn.Module, inputs: LayerInputs, name: str, linear: QuantizableWeight) -> Tensor:
    """``2 X^T X / n`` of what ``linear``'s weight multiplies, over all batches (rest of the layer skipped) and
    over all ranks (``lowbit.distributed``); each weight on the way is fake-quantized once for all batches
    (``weights_reused``)."""
    accumulator = HessianAccumulator(linear.in_features, linear.weight.device)
    with weights_reused(layer):
        inputs.feed(layer, {name: linear}, lambda _n, x: accumulator.add(effective_input(linear, x)),
                    stop_after=linear)
    accumulator.combine_ranks()
    return accumulator.hessian
