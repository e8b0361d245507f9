"""The ``rotate`` option every calibration algorithm takes: the rotation fused into the model before it runs.

- ``False``: none; ``True`` or ``"quarot"``: QuaRot with its defaults (``lowbit.rotation.quarot``);
  ``"spinquant"``: SpinQuant's learned rotations with their defaults (``lowbit.rotation.spinquant``);
- a dict ``{"method": "quarot" | "spinquant", **options}`` over that method's options; a dict without
  ``"method"`` is QuaRot's (``{"seed": 2, "down_proj": False}``).

Validated once (:func:`check_rotation_options`, at config parse time and before calibration), applied by
:func:`apply_rotation`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lowbit.calibration import ForwardLoop
from lowbit.rotation.quarot import check_rotation_options as check_quarot_options
from lowbit.rotation.quarot import rotate
from lowbit.rotation.spinquant import check_spinquant_options, spinquant

ROTATION_METHODS = ("quarot", "spinquant")


def check_rotation_options(value: Any) -> dict | None:
    """``{"method": name, **all its options}`` for a ``rotate`` value, or None for False; errors name the value,
    the key and what is allowed."""
    if isinstance(value, str):
        if value not in ROTATION_METHODS:
            raise ValueError(f"rotate={value!r}: unknown rotation; allowed: {list(ROTATION_METHODS)}")
        value = {"method": value}
    if isinstance(value, dict) and "method" in value:
        method, options = value["method"], {k: v for k, v in value.items() if k != "method"}
        if method not in ROTATION_METHODS:
            raise ValueError(f"rotate: method={method!r} is unknown; allowed: {list(ROTATION_METHODS)}")
        if method == "spinquant":
            return {"method": method, **check_spinquant_options(options)}
        value = options or True
    merged = check_quarot_options(value)
    return None if merged is None else {"method": "quarot", **merged}


def apply_rotation(model: nn.Module, rotation: dict, forward_loop: ForwardLoop | None) -> None:
    """Fuse the rotation :func:`check_rotation_options` returned into ``model`` (SpinQuant learns it on
    ``forward_loop``'s batches first)."""
    options = {k: v for k, v in rotation.items() if k != "method"}
    if rotation["method"] == "spinquant":
        spinquant(model, forward_loop, **options)
    else:
        rotate(model, **options)
