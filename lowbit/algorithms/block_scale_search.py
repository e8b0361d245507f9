"""The ``block_scale_search`` algorithm: NVFP4 / MXFP4 weights get per-block scales chosen by their squared
error (``lowbit.formats.scale_search``: ``search="mse"`` over neighbouring scales, or ``"4over6"``), stored as
each weight quantizer's ``block_amax``; activations keep their dynamic per-block scales.

Steps: max calibration (the NVFP4 global amax of each weight; activation quantizers from ``forward_loop`` if
they are static), then the search on every enabled NVFP4 / MX weight quantizer. Data-free.
"""

from __future__ import annotations

from torch import nn

from lowbit import formats
from lowbit.calibration import max_calibrate
from lowbit.formats.scale_search import MX_METHODS, NVFP4_METHODS, mx_block_amax, nvfp4_block_amax
from lowbit.quantizer import TensorQuantizer
from lowbit.structure.groups import row_weights
from lowbit.structure.weights import QuantizableWeight

BLOCK_SCALE_SEARCH_OPTIONS = {"search": "mse"}


def searchable_weights(model: nn.Module, search: str) -> dict[str, QuantizableWeight]:
    """Every 2-D weight with an enabled weight quantizer; ValueError naming the first that is not one
    TensorQuantizer of NVFP4 or MX format (or whose format lacks ``search``), before any changes."""
    found = {}
    for name, weight in row_weights(model).items():
        quantizer = weight.weight_quantizer
        if not quantizer.is_enabled:
            continue
        config = getattr(quantizer, "config", None)
        scale_bits = None if config is None else config.block_scale_bits
        if not isinstance(quantizer, TensorQuantizer) or scale_bits not in ((4, 3), (8, 0)):
            label = type(quantizer).__name__ if config is None else f"{config.format_name} {config.granularity}"
            raise ValueError(f"{name}.weight_quantizer: block_scale_search needs an NVFP4 or MX weight "
                             f"quantizer, got {label}")
        allowed = NVFP4_METHODS if scale_bits == (4, 3) else MX_METHODS
        if search not in allowed:
            raise ValueError(f"{name}.weight_quantizer: block_scale_search search={search!r} is not defined for "
                             f"{config.format_name}; allowed are {list(allowed)}")
        if weight.weight.dim() != 2:
            raise ValueError(f"{name}.weight_quantizer: block_scale_search needs a 2-D weight, got shape "
                             f"{tuple(weight.weight.shape)}")
        found[name] = weight
    return found


def search_block_scales(weight: QuantizableWeight, search: str) -> None:
    """Store the searched ``block_amax`` of one weight in its quantizer (global amax from max calibration)."""
    quantizer = weight.weight_quantizer
    w = weight.weight.detach()
    if quantizer.pre_quant_scale is not None:  # the quantizer quantizes weight * pre_quant_scale
        w = w * quantizer.pre_quant_scale.to(w.dtype)
    config = quantizer.config
    if config.block_scale_bits == (4, 3):
        quantizer.block_amax = nvfp4_block_amax(w, quantizer.amax, search, config.block_axes[-1])
    else:
        quantizer.block_amax = mx_block_amax(w, formats.float_format(config.num_bits), search,
                                             config.block_axes[-1])


def check_block_scale_search_options(options: dict) -> None:
    allowed = sorted(set(NVFP4_METHODS) | set(MX_METHODS))
    if options["search"] not in allowed:
        raise ValueError(f"block_scale_search: search={options['search']!r}; allowed are {allowed}")


def block_scale_search(model: nn.Module, forward_loop=None, search: str = "mse") -> None:
    """Max calibration, then the per-block scale search of every NVFP4 / MX weight (module docstring)."""
    weights = searchable_weights(model, search)
    max_calibrate(model, forward_loop)
    for weight in weights.values():
        search_block_scales(weight, search)
