"""Range search for asymmetric 4-bit weights: per group, the shrunk min/max with the least squared error.

For each group (the quantizer's block view) and each ``m`` of the scale-search grid (``SCALE_SEARCH``:
0.5 to 1 in steps of 1/32), the range ``[m * min, m * max]`` quantizes the group with lowbit's
asymmetric formula (``lowbit.formats.fake_quant_int_asym``); the group keeps the ``m`` with the least
``sum((w_hat - w)**2)`` (the first, i.e. smallest, ``m`` on ties). ``m = 1`` is min/max calibration, so
the error never grows.

Symmetric quantizers get the same search from lowbit's ``mse`` calibrator; asymmetric ones keep their
running min/max there, hence this step (to move into ``lowbit.calib`` once its mse calibrator covers
asymmetric formats).
"""

from __future__ import annotations

import torch

from lowbit import formats
from lowbit.quantizer import BlockView, TensorQuantizer
from lowbit.weight_compression.modes import SCALE_SEARCH


def search_multipliers() -> list[float]:
    """The grid of ``SCALE_SEARCH``: ``linspace(start_multiplier, stop_multiplier, num_steps)``."""
    grid = torch.linspace(SCALE_SEARCH["start_multiplier"], SCALE_SEARCH["stop_multiplier"],
                          SCALE_SEARCH["num_steps"], dtype=torch.float64)
    return grid.tolist()


def search_asymmetric_range(quantizer: TensorQuantizer, weight: torch.Tensor) -> None:
    """Shrink a calibrated asymmetric quantizer's ``amin``/``amax`` per group (module docstring).

    ``weight`` is the tensor the quantizer quantizes (``(out, in)`` for a Linear).
    """
    config = quantizer.config
    if not config.asymmetric or quantizer.amin is None or quantizer.amax is None:
        raise ValueError(f"search_asymmetric_range needs a calibrated asymmetric quantizer, got {quantizer}")
    view = BlockView(config, weight.shape)
    groups = view.to_view(weight.detach().float())
    low, high = quantizer.amin, quantizer.amax
    best_error, best_multiplier = None, None
    for multiplier in search_multipliers():
        quantized = formats.fake_quant_int_asym(groups, low * multiplier, high * multiplier, config.num_bits)
        error = (quantized.double() - groups.double()).square().sum(dim=view.reduce_dims, keepdim=True)
        if best_error is None:
            best_error, best_multiplier = error, torch.full_like(error, multiplier)
            continue
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_multiplier = torch.where(better, multiplier, best_multiplier)
    quantizer.amin = (low * best_multiplier).float()
    quantizer.amax = (high * best_multiplier).float()
