"""Calibrator interface and the running-max calibrator.

A calibrator watches tensors during calibration (``collect``) and proposes the ``amax`` a quantizer
should use (``compute_amax``). The quantizer hands ``collect`` its input already reshaped into its
block view; ``reduce_dims`` says which dims share one amax:

- ``reduce_dims=None``: one amax for the whole tensor, a 0-dim float32 tensor (``reduce_dims`` naming
  every dim is the same, with the amax shaped ``(1, ..., 1)``);
- ``reduce_dims=(d, ...)``: amax = ``|x|.amax(dim=reduce_dims, keepdim=True)``, so it broadcasts
  against the block view (per-channel: ``(out, 1)``; per-block: ``(..., n_blocks, 1)``).
"""

from __future__ import annotations

import torch
from torch import Tensor


class Calibrator:
    """Base calibrator: holds ``reduce_dims`` and the input checks every calibrator shares."""

    def __init__(self, reduce_dims: tuple[int, ...] | None = None) -> None:
        if reduce_dims is not None:
            if not isinstance(reduce_dims, tuple) or not all(isinstance(d, int) for d in reduce_dims):
                raise TypeError(f"reduce_dims must be a tuple of ints or None, got {reduce_dims!r}")
            if len(reduce_dims) == 0:
                raise ValueError("reduce_dims must name at least one dim, or be None (reduce all dims)")
        self.reduce_dims = reduce_dims

    def collect(self, x: Tensor) -> None:
        """Update the statistics with ``x`` (any float dtype; not modified)."""
        raise NotImplementedError

    def compute_amax(self) -> Tensor | None:
        """The proposed amax (float32, on the device of the collected data), or None before any collect."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget everything collected."""
        raise NotImplementedError

    def _checked(self, x: Tensor) -> Tensor:
        """``x`` detached, after rejecting non-float input or ``reduce_dims`` that do not fit it."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(
                f"{type(self).__name__}.collect expects a floating-point tensor, got {_describe(x)}"
            )
        if self.reduce_dims is not None:
            for d in self.reduce_dims:
                if not -x.dim() <= d < x.dim():
                    raise ValueError(
                        f"reduce_dims {self.reduce_dims} do not fit an input of shape {tuple(x.shape)}"
                    )
        return x.detach()

    def _finite(self, batch_amax: Tensor, x: Tensor) -> Tensor:
        """``batch_amax`` (a max of ``|x|``) after rejecting NaN / Inf, which a max carries from any element
        of ``x``: one check on the reduced tensor instead of one over every activation."""
        if not bool(torch.isfinite(batch_amax).all()):
            raise ValueError(
                f"{type(self).__name__}.collect got an input containing NaN or Inf "
                f"(shape {tuple(x.shape)}); the amax would be meaningless"
            )
        return batch_amax

    def per_tensor_shape(self, x: Tensor) -> tuple[int, ...] | None:
        """The amax shape if one amax covers all of ``x``: ``()`` for ``reduce_dims=None``, ``(1,) * x.dim()``
        when ``reduce_dims`` lists every dim (the quantizer's per-tensor view); None for a partial reduction."""
        if self.reduce_dims is None:
            return ()
        return (1,) * x.dim() if {d % x.dim() for d in self.reduce_dims} == set(range(x.dim())) else None

    def _abs_amax(self, x: Tensor) -> Tensor:
        """``|x|`` max at this calibrator's granularity, float32."""
        magnitude = x.abs().float()
        if self.reduce_dims is None:
            return magnitude.amax()
        return magnitude.amax(dim=self.reduce_dims, keepdim=True)


class MaxCalibrator(Calibrator):
    """Running max of ``|x|``: amax = max over every collected tensor (elementwise over the kept dims)."""

    def __init__(self, reduce_dims: tuple[int, ...] | None = None) -> None:
        super().__init__(reduce_dims)
        self._amax: Tensor | None = None

    def collect(self, x: Tensor) -> None:
        batch_amax = self._finite(self._abs_amax(self._checked(x)), x)
        self._amax = running_max(self._amax, batch_amax, type(self).__name__)

    def compute_amax(self) -> Tensor | None:
        return self._amax

    def reset(self) -> None:
        self._amax = None


def running_max(current: Tensor | None, batch_amax: Tensor, owner: str) -> Tensor:
    """``max(current, batch_amax)`` elementwise; shapes must agree (the kept dims cannot change)."""
    if current is None:
        return batch_amax
    if current.shape != batch_amax.shape:
        raise ValueError(
            f"{owner}: amax shape changed between collects, {tuple(current.shape)} then "
            f"{tuple(batch_amax.shape)}; the dims not in reduce_dims must keep their sizes"
        )
    return torch.maximum(current, batch_amax)


def _describe(x: object) -> str:
    return f"dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
