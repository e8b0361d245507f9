"""Calibrator factory: build a calibrator from a quantizer config's ``calibrator`` value.

``calibrator`` is a method name ("max", "percentile", "mse", "entropy") or a dict with ``"method"``
plus that method's options, e.g. ``{"method": "percentile", "percentile": 99.9}``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from lowbit.calib.base import Calibrator, MaxCalibrator
from lowbit.calib.histogram import EntropyCalibrator, HistogramCalibrator, PercentileCalibrator
from lowbit.calib.mse import MseCalibrator

__all__ = [
    "CALIBRATOR_OPTIONS",
    "Calibrator",
    "EntropyCalibrator",
    "HistogramCalibrator",
    "MaxCalibrator",
    "MseCalibrator",
    "PercentileCalibrator",
    "make_calibrator",
]

# Options a config may set for each method (the rest comes from the quantizer).
CALIBRATOR_OPTIONS: dict[str, tuple[str, ...]] = {
    "max": (),
    "percentile": ("percentile", "num_bins"),
    "entropy": ("num_bins",),
    "mse": ("num_steps", "start_multiplier", "stop_multiplier", "sample_size"),
}


def make_calibrator(
    spec: str | dict,
    reduce_dims: tuple[int, ...] | None,
    quant_fn: Callable[[Tensor, Tensor], Tensor] | None,
    num_bits: int | tuple[int, int],
    unsigned: bool = False,
) -> Calibrator:
    """The calibrator ``spec`` names, for a quantizer with ``reduce_dims``, ``quant_fn`` and ``num_bits``.

    ``quant_fn(x, amax)`` (fake-quantize x with that amax) is needed by "mse" only; ``num_bits`` and
    ``unsigned`` by "entropy" only (integer formats). Raises ValueError for an unknown method or option.
    """
    method, options = _parse(spec)
    if method == "max":
        return MaxCalibrator(reduce_dims)
    if method == "percentile":
        return PercentileCalibrator(reduce_dims, **options)
    if method == "entropy":
        return EntropyCalibrator(reduce_dims, num_bits=num_bits, unsigned=unsigned, **options)
    if quant_fn is None:
        raise ValueError("calibrator 'mse' needs the quantizer's quant_fn(x, amax), got quant_fn=None")
    return MseCalibrator(quant_fn, reduce_dims, **options)


def _parse(spec: str | dict) -> tuple[str, dict]:
    """``(method, options)`` from a name or a ``{"method": ..., **options}`` dict, validated."""
    if isinstance(spec, str):
        method, options = spec, {}
    elif isinstance(spec, dict):
        if "method" not in spec:
            raise ValueError(f"calibrator dict needs a 'method' key, got {spec!r}")
        options = dict(spec)
        method = options.pop("method")
    else:
        raise TypeError(f"calibrator must be a method name or a dict, got {type(spec).__name__}: {spec!r}")
    if method not in CALIBRATOR_OPTIONS:
        raise ValueError(f"unknown calibrator method {method!r}; allowed: {sorted(CALIBRATOR_OPTIONS)}")
    unknown = sorted(set(options) - set(CALIBRATOR_OPTIONS[method]))
    if unknown:
        raise ValueError(
            f"calibrator {method!r} got unknown options {unknown}; "
            f"allowed: {list(CALIBRATOR_OPTIONS[method])}"
        )
    return method, options
