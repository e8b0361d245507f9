"""AutoRound (Cheng et al. 2023, "Optimize Weight Rounding via Signed Gradient Descent for the Quantization of
LLMs"; Intel's auto-round): per decoder block, learn each weight's rounding offset and each group's clipping
factors by signed gradient descent on the block's output error against its float output.

For one weight group ``w`` (``g`` input columns of one row) on lowbit's integer grid (``lowbit.formats``), with
``[amin0, amax0]`` the quantizer's range before tuning (max calibration, or what an earlier step stored), the
tunables are ``V`` (one per weight, in ``[-0.5, 0.5]``, start 0) and ``alpha``, ``beta`` (one each per group,
in ``[0, 1]``, start 1; ``alpha`` asymmetric only):

- symmetric:  ``amax = beta * amax0``, ``s = qmax / amax``, ``q = clamp(round(w s + V), qmin, qmax)``,
  ``w_hat = q / s``;
- asymmetric: ``amin = alpha * amin0``, ``amax = beta * amax0``, widened to contain 0,
  ``d = (amax - amin) / qmax``, ``z = clamp(round(-amin / d), 0, qmax)``,
  ``c = clamp(round(w / d + V) + z, 0, qmax)``, ``w_hat = (c - z) d``.

With ``V = 0``, ``alpha = beta = 1`` this is the format's own round-to-nearest. ``round`` passes gradients
straight through (STE), ``clamp`` passes none outside its range. The loss is the block's output MSE against
the float block's output on the same calibration inputs (every batch, each step), or the float model's output
of the block where the runner gives it (``layer_inputs="quantized_float_targets"``, ``lowbit.algorithms.layerwise``),
with every weight of the block quantized this way and the block's other quantizers off.

With ``batches_per_step = k > 0`` step ``t`` takes the loss over ``k`` of the ``n`` calibration batches only,
batches ``t k, .., t k + k - 1`` (mod ``n``), as auto-round draws a minibatch of its samples each step: more
calibration windows at the cost of ``k`` per step (0: every batch, each step).

For ``t = 0 .. iterations - 1`` (auto-round's defaults: 200 steps, ``lr = 1 / iterations``, the same rate for
the clipping factors):

1. ``L_t`` = the loss at the current tunables (on step ``t``'s batches); the tunables with the least ``L_t`` so
   far are kept (``t = 0`` is round-to-nearest, so with every batch each step the kept result is never worse than
   it on the calibration data);
2. ``p -= lr_t * sign(dL_t / dp)`` for every tunable ``p``, ``lr_t = lr * (1 - t / iterations)`` (linear
   decay to 0) with ``minmax_lr`` for the clipping factors; then ``V`` is clamped to ``[-0.5, 0.5]`` and
   ``alpha``, ``beta`` to ``[0, 1]``. The result of the last step is scored too.

Started from GPTQ (``start="gptq"``): GPTQ + scale estimation quantizes the block first (``lowbit.algorithms.
gptq``); its grid is the start range and ``V`` starts at ``(w_gptq - w) / d`` (``d`` the grid step, ``1 / s``
symmetric), the offset that gives GPTQ's codes from the float weight ``w``, with ``V`` in ``[-1, 1]`` (GPTQ's
error feedback moves most codes by at most a step from round-to-nearest's; a code further away starts at the
reachable neighbour on its side). Step 1 at ``t = 0`` then scores GPTQ's result, and the descent refines it on
the block's output.

The kept tunables are written back as the quantized weight ``w_hat`` and the quantizer's static range
``(amin, amax)``: the format re-rounds ``w_hat`` to the same codes, so export and packing need nothing new.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lowbit import formats
from lowbit.algorithms.layerwise import LayerInputs, quantizers_disabled
from lowbit.algorithms.option_rules import STEP_RULES, check_option_rules
from lowbit.algorithms.scale_estimation import IntGrid, estimation_group_size, quantizer_range, store_range
from lowbit.structure.groups import row_weights
from lowbit.structure.weights import QuantizableWeight

AUTOROUND_OPTIONS = {"iterations": 200, "lr": 0.005, "minmax_lr": 0.005, "batches_per_step": 0, "start": "rtn"}
STARTS = ("rtn", "gptq")
TINY = 2.0**-24  # lowbit.formats' threshold below which a range quantizes to 0


def round_ste(x: Tensor) -> Tensor:
    """``round_half_even(x)`` forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


@dataclass
class Rounding:
    """The tunables of one weight ``(out, in)`` seen as groups ``(out, n, g)``: ``offset`` V ``(out, n, g)`` in
    ``[-offset_bound, offset_bound]``, ``min_scale`` alpha (asymmetric; else None) and ``max_scale`` beta
    ``(out, n, 1)``, and the start range."""

    grid: IntGrid
    groups: Tensor
    start: tuple[Tensor | None, Tensor]
    offset: Tensor
    min_scale: Tensor | None
    max_scale: Tensor
    offset_bound: float = 0.5

    @classmethod
    def start_at(cls, grid: IntGrid, weight: Tensor, start: tuple[Tensor | None, Tensor], group_size: int
                 ) -> Rounding:
        """Round-to-nearest on ``start``: ``V = 0``, ``alpha = beta = 1`` (in ``weight``'s dtype)."""
        groups = weight.detach().reshape(weight.shape[0], -1, group_size)
        start = tuple(None if bound is None else bound.to(groups.dtype) for bound in start)
        ones = torch.ones_like(start[1])
        return cls(grid, groups, start, torch.zeros_like(groups).requires_grad_(),
                   ones.clone().requires_grad_() if grid.asymmetric else None, ones.requires_grad_())

    def start_from(self, w_hat: Tensor) -> None:
        """``V = clamp((w_hat - w) / d, -1, 1)`` in ``[-1, 1]``: the offsets that give ``w_hat``'s codes (``w_hat``
        ``(out, in)`` on the start grid, e.g. GPTQ's; module docstring), ``d`` the start grid's step."""
        step = grid_step(self.grid, *self.start)
        with torch.no_grad():
            self.offset.copy_(((w_hat.reshape(self.groups.shape) - self.groups) / step).clamp(-1.0, 1.0))
        self.offset_bound = 1.0

    def range(self) -> tuple[Tensor | None, Tensor]:
        """``(alpha amin0 or None, beta amax0)``."""
        amin0, amax0 = self.start
        return (None if amin0 is None else self.min_scale * amin0), self.max_scale * amax0

    def quantized(self) -> Tensor:
        """``w_hat`` ``(out, in)`` (module docstring), differentiable in the tunables."""
        amin, amax = self.range()
        return fake_quant_ste(self.grid, self.groups, self.offset, amin, amax).reshape(self.groups.shape[0], -1)

    def tunables(self, lr: float, minmax_lr: float) -> list[tuple[Tensor, float, float, float]]:
        """``(tensor, learning rate, low, high)``: V in ``[-0.5, 0.5]``, the clipping factors in ``[0, 1]``
        (none with ``minmax_lr = 0``)."""
        found = [(self.offset, lr, -self.offset_bound, self.offset_bound)]
        if minmax_lr > 0:
            found += [(scale, minmax_lr, 0.0, 1.0) for scale in (self.min_scale, self.max_scale) if scale is not None]
        return found


def grid_step(grid: IntGrid, amin: Tensor | None, amax: Tensor) -> Tensor:
    """The grid's step ``d``: ``(max(amax, 0) - min(amin, 0)) / qmax`` asymmetric, ``amax / qmax`` symmetric (1
    where the range is below ``2**-24``)."""
    if grid.asymmetric:
        low, high = amin.clamp(max=0), amax.clamp(min=0)
        return torch.where((high - low) <= TINY, 1.0, (high - low) / grid.qmax)
    qmax = formats.int_range(grid.num_bits, grid.unsigned, grid.narrow_range)[1]
    return torch.where(amax <= TINY, 1.0, amax / qmax)


def fake_quant_ste(grid: IntGrid, w: Tensor, offset: Tensor, amin: Tensor | None, amax: Tensor) -> Tensor:
    """The format's fake quantization of ``w`` with rounding offset ``offset`` (module docstring), STE rounding;
    ranges broadcast with ``w``. Where the (widened) range is below ``2**-24`` the weights become 0, as in
    ``lowbit.formats``."""
    if grid.asymmetric:
        low, high = amin.clamp(max=0), amax.clamp(min=0)
        tiny = (high - low) <= TINY
        step = torch.where(tiny, 1.0, (high - low) / grid.qmax)
        zero = torch.clamp(round_ste(-low / step), 0, grid.qmax)
        codes = torch.clamp(round_ste(w / step + offset) + zero, 0, grid.qmax)
        return torch.where(tiny, 0.0, (codes - zero) * step)
    qmin, qmax = formats.int_range(grid.num_bits, grid.unsigned, grid.narrow_range)
    tiny = amax <= TINY
    scale = torch.div(amax.new_tensor(float(qmax)), torch.where(tiny, 1.0, amax))  # true division, as the format
    codes = torch.clamp(round_ste(w * scale + offset), qmin, qmax)
    return torch.where(tiny, 0.0, codes / scale)


def signed_gradient_step(tunables: list[tuple[Tensor, float, float, float]], gradients: list[Tensor]) -> None:
    """Step 2 of the module docstring: ``p -= rate * sign(gradient)``, then ``p`` clamped to ``[low, high]``,
    for each ``(p, rate, low, high)`` of ``Rounding.tunables`` (rates already decayed)."""
    with torch.no_grad():
        for (tensor, rate, low, high), gradient in zip(tunables, gradients, strict=True):
            tensor -= rate * torch.sign(gradient)
            tensor.clamp_(low, high)


LossOf = Callable[[dict[str, Tensor], int], Tensor]  # ({name: w_hat (out, in)}, step t) -> scalar loss


def autoround(roundings: dict[str, Rounding], loss_of: LossOf, iterations: int = 200, lr: float = 0.005,
              minmax_lr: float = 0.005) -> tuple[dict[str, tuple[Tensor, Tensor | None, Tensor]], float]:
    """Signed gradient descent of ``roundings`` on ``loss_of`` (module docstring, steps 1-2); returns per name
    ``(w_hat, amin or None, amax)`` of the tunables with the least loss, and that loss. ``minmax_lr = 0``
    keeps the clipping factors at 1 (rounding only)."""
    best, best_loss = None, float("inf")
    for t in range(iterations + 1):
        loss = loss_of({name: r.quantized() for name, r in roundings.items()}, t)
        if float(loss.detach()) < best_loss:
            best_loss = float(loss.detach())
            best = {name: _detached(r) for name, r in roundings.items()}
        if t == iterations:  # the result of the last step is scored too
            break
        decay = 1 - t / iterations
        tunables = [entry for r in roundings.values() for entry in r.tunables(lr * decay, minmax_lr * decay)]
        # only the tunables' gradients: the block's own parameters get none
        gradients = torch.autograd.grad(loss, [entry[0] for entry in tunables], allow_unused=True,
                                        materialize_grads=True)
        signed_gradient_step(tunables, list(gradients))
    return best, best_loss


def _detached(rounding: Rounding) -> tuple[Tensor, Tensor | None, Tensor]:
    with torch.no_grad():
        amin, amax = rounding.range()
        return rounding.quantized().clone(), None if amin is None else amin.clone(), amax.clone()


# ---- layer pass -----------------------------------------------------------------------------------------


def tunable_weights(layer: nn.Module, prefix: str = "") -> dict[str, QuantizableWeight]:
    """The weights of ``layer`` with an enabled weight quantizer; ValueError naming (after ``prefix``) the first
    AutoRound cannot tune: not a static symmetric or asymmetric integer grid per channel or group, or not a
    plain or transposed linear."""
    weights = {name: w for name, w in row_weights(layer).items() if w.weight_quantizer.is_enabled}
    for name, weight in weights.items():
        where = f"{prefix}{name}.weight_quantizer"
        estimation_group_size(weight, where)
        if IntGrid.of(weight.weight_quantizer).signed_scale:
            raise ValueError(f"{where}: AutoRound tunes symmetric and asymmetric integer grids, not signed scales")
        if weight.kind not in ("linear", "transposed"):
            raise ValueError(f"{prefix}{name}: AutoRound tunes linear weights, not {weight.kind!r} weights")
    return weights


def autoround_layer(layer: nn.Module, inputs: LayerInputs, iterations: int = 200, lr: float = 0.005,
                    minmax_lr: float = 0.005, batches_per_step: int = 0,
                    start_pass: Callable[[nn.Module, LayerInputs], object] | None = None) -> float:
    """AutoRound of every tunable weight of ``layer`` against its float output on ``inputs`` (or
    ``inputs.targets``); replaces each weight by its quantized value and stores the range in its quantizer.
    ``start_pass`` (e.g. GPTQ's layer pass) quantizes the block first: the descent starts from its codes and grid
    (``Rounding.start_from``), from the float weights. Returns the best loss."""
    weights = tunable_weights(layer)
    if not weights:
        return 0.0
    float_weights = {name: weight.weight.detach().float().clone() for name, weight in weights.items()}
    if start_pass is not None:
        start_pass(layer, inputs)
    references = inputs.targets
    if references is None:
        with quantizers_disabled(layer):
            references = list(inputs.forward(layer))
    roundings = {}
    for name, weight in weights.items():
        group_size = estimation_group_size(weight, name)
        start = quantizer_range(weight.weight_quantizer, weight.weight, group_size)
        roundings[name] = Rounding.start_at(IntGrid.of(weight.weight_quantizer), float_weights[name], start,
                                            group_size)
        if start_pass is not None:
            roundings[name].start_from(weight.weight.detach().float())

    def loss_of(quantized: dict[str, Tensor], step: int) -> Tensor:
        parameters = {f"{name}.weight": w_hat.t() if weights[name].kind == "transposed" else w_hat
                      for name, w_hat in quantized.items()}
        total, chosen = 0.0, step_batches(step, batches_per_step, len(references))
        for index in chosen:
            args, kwargs = inputs.calls[index]
            output = functional_call(layer, parameters, args, kwargs)
            output = output[0] if isinstance(output, (tuple, list)) else output
            total = total + (output.float() - references[index].float()).square().mean()
        return total / len(chosen)

    with quantizers_disabled(layer), torch.enable_grad():
        best, loss = autoround(roundings, loss_of, iterations, lr, minmax_lr)
    for name, (w_hat, amin, amax) in best.items():
        weight = weights[name]
        with torch.no_grad():
            weight.weight.copy_(w_hat)
        store_range(weight.weight_quantizer, weight.weight, amin, amax)
    return loss


def step_batches(step: int, batches_per_step: int, batches: int) -> list[int]:
    """The batches step ``step`` takes: ``step k .. step k + k - 1`` mod ``batches`` (``k = batches_per_step``,
    at most ``batches``; 0: all of them)."""
    if batches_per_step <= 0 or batches_per_step >= batches:
        return list(range(batches))
    return [(step * batches_per_step + i) % batches for i in range(batches_per_step)]


def check_autoround_options(options: dict) -> None:
    """ValueError naming the option unless iterations >= 1, lr > 0, minmax_lr >= 0, batches_per_step >= 0 and
    start is one of ``STARTS``."""
    if options["start"] not in STARTS:
        raise ValueError(f"autoround: start={options['start']!r}; allowed: {list(STARTS)}")
    check_option_rules("autoround", options, {**STEP_RULES, "minmax_lr": (lambda value: value >= 0,
                                                                          ">= 0 (0: no clipping factors)")})
