"""Range search for 4-bit integer weights: per group, the shrunk min/max with the least error.

For each group (the quantizer's block view) and each ``m`` of the scale-search grid (``SCALE_SEARCH``:
0.5 to 1 in steps of 1/32), the range ``[m * min, m * max]`` quantizes the group with the quantizer's own
formula (``TensorQuantizer.fake_quant_view``: asymmetric, or symmetric with a signed scale, whose step is
then ``m * max|w| / 8``); the group keeps the ``m`` with the least error (the first, i.e. smallest, ``m``
on ties). ``m = 1`` is min/max calibration, so the error never grows. The error (``objective``):

- ``"squared"``: ``sum((w_hat - w)**2)``;
- ``"max_abs"``: ``max |w_hat - w|``, which weighs the clipping of the group's largest weights
  (``(1 - m) max|w|``) against the rounding of all (half a step): it shrinks a range only as far as the
  clipped weights stay within rounding error of the others.
"""

from __future__ import annotations

import torch

from lowbit.quantizer import BlockView, TensorQuantizer
from lowbit.weight_compression.modes import SCALE_SEARCH


def search_multipliers() -> list[float]:
    """The grid of ``SCALE_SEARCH``: ``linspace(start_multiplier, stop_multiplier, num_steps)``."""
    grid = torch.linspace(SCALE_SEARCH["start_multiplier"], SCALE_SEARCH["stop_multiplier"],
                          SCALE_SEARCH["num_steps"], dtype=torch.float64)
    return grid.tolist()


OBJECTIVES = ("squared", "max_abs")


def search_range(quantizer: TensorQuantizer, weight: torch.Tensor, objective: str = "squared") -> None:
    """Shrink a calibrated ``[amin, amax]`` quantizer's range per group (module docstring).

    ``weight`` is the tensor the quantizer quantizes (``(out, in)`` for a Linear).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r}: allowed are {list(OBJECTIVES)}")
    config = quantizer.config
    if not config.keeps_amin or quantizer.amin is None or quantizer.amax is None:
        raise ValueError(f"search_range needs a calibrated asymmetric or signed-scale quantizer, got {quantizer}")
    view = BlockView(config, weight.shape)
    groups = view.to_view(weight.detach().float())
    low, high = quantizer.amin, quantizer.amax
    best_error, best_multiplier = None, None
    for multiplier in search_multipliers():
        quantized = quantizer.fake_quant_view(groups, high * multiplier, low * multiplier)
        delta = (quantized.double() - groups.double()).abs()
        if objective == "squared":
            error = delta.square().sum(dim=view.reduce_dims, keepdim=True)
        else:
            error = delta.amax(dim=view.reduce_dims, keepdim=True)
        if best_error is None:
            best_error, best_multiplier = error, torch.full_like(error, multiplier)
            continue
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_multiplier = torch.where(better, multiplier, best_multiplier)
    quantizer.amin = (low * best_multiplier).float()
    quantizer.amax = (high * best_multiplier).float()
