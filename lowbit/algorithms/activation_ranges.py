"""Static input ranges of linears from per-channel input maxima, without a calibration pass of their own.

A linear's input quantizer that is static, symmetric, per-tensor and uses the max calibrator
(:func:`is_analytic`) has ``amax = max_{t,j} |x_tj * p_j| = max_j e_j`` with ``e_j = max_t |x_tj| * p_j``
the per-channel maxima of its *effective* input (``x`` times the quantizer's ``pre_quant_scale`` ``p``,
1 if none). Once ``e`` is recorded (a forward pre-hook in a pass that runs anyway), an input scaling
``x -> x / s`` (SmoothQuant, AWQ; folded into the norm or as ``p``) gives ``e_j / s_j``, and the amax
follows with no pass over the data: exactly what max calibration of the scaled inputs gives.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from lowbit import distributed
from lowbit.quantizer import TensorQuantizer
from lowbit.structure.weights import QuantizableWeight

logger = logging.getLogger(__name__)


def is_analytic(quantizer: nn.Module) -> bool:
    """A TensorQuantizer that is enabled, static, symmetric, with the max calibrator and one per-tensor
    amax: per-tensor scales, or NVFP4 (its amax is the per-tensor global one; block scales are dynamic)."""
    if not isinstance(quantizer, TensorQuantizer) or not quantizer.is_enabled:
        return False
    config = quantizer.config
    method = config.calibrator["method"] if isinstance(config.calibrator, dict) else config.calibrator
    per_tensor = (config.axis is None and config.block_sizes is None) or config.block_scale_bits == (4, 3)
    return not config.is_dynamic and method == "max" and not config.asymmetric and per_tensor


def channel_maxima(x: Tensor) -> Tensor:
    """``max_t |x_tj|`` over every dim but the last: shape ``(in,)``, float32 (amax and amin: torch's CPU
    aminmax over a dim is ~15x slower than the two reductions)."""
    rows = x.detach().reshape(-1, x.shape[-1])
    return torch.maximum(rows.amax(dim=0), -rows.amin(dim=0)).float()


def smoothed_amax(activation_amax: Tensor, scale: Tensor) -> Tensor:
    """``max_j activation_amax_j / scale_j``: the per-tensor max |x / s| (0-dim float32)."""
    return (activation_amax.float() / scale.float().to(activation_amax.device)).amax()


class ChannelMaxima:
    """Input observers (``QuantizableWeight.observe_inputs``) recording ``max|x_j|`` over all calls of each
    weight's raw input (float32, ``(in,)``) until :meth:`close`, then the max over ranks
    (``lowbit.distributed``). Weights called one after another on the same tensor (q, k, v) share one
    reduction."""

    def __init__(self, linears: Iterable[QuantizableWeight]) -> None:
        self.linears = list(linears)
        self.amax: dict[QuantizableWeight, Tensor] = {}
        self._last: tuple[Tensor, Tensor] | None = None
        self.handles = [linear.observe_inputs(lambda x, linear=linear: self._record(linear, x))
                        for linear in self.linears]

    def _record(self, linear: QuantizableWeight, x: Tensor) -> None:
        if self._last is not None and self._last[0] is x:
            amax = self._last[1]
        else:
            amax = channel_maxima(x)
            self._last = (x, amax)
        self.amax[linear] = torch.maximum(self.amax[linear], amax) if linear in self.amax else amax

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self._last = None
        if distributed.is_active():
            combined = distributed.elementwise_max([self.amax.get(linear) for linear in self.linears])
            self.amax = {linear: amax for linear, amax in zip(self.linears, combined, strict=True)
                         if amax is not None}


class InputRanges:
    """Effective-input channel maxima ``e`` of the linears among ``linears`` whose input quantizer is
    analytic (module docstring): :meth:`recording` measures them in a pass, :meth:`rescale` follows an
    input scaling, :meth:`apply` sets each quantizer's amax to ``max_j e_j``."""

    def __init__(self, linears: Iterable[QuantizableWeight]) -> None:
        self.linears = [linear for linear in linears if is_analytic(linear.input_quantizer)]
        self.effective: dict[QuantizableWeight, Tensor] = {}

    @property
    def quantizers(self) -> list[TensorQuantizer]:
        return [linear.input_quantizer for linear in self.linears]

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Measure ``e`` afresh from every call of the linears while the block runs."""
        maxima = ChannelMaxima(self.linears)
        try:
            yield
        finally:
            maxima.close()
        self.effective = {}
        for linear, raw in maxima.amax.items():
            scale = linear.input_quantizer.pre_quant_scale
            self.effective[linear] = raw if scale is None else raw * scale.float().to(raw.device)

    def rescale(self, linears: Iterable[QuantizableWeight], scale: Tensor) -> None:
        """The inputs of ``linears`` became ``x / scale`` (per input channel): ``e_j /= scale_j``."""
        for linear in linears:
            if linear in self.effective:
                self.effective[linear] = self.effective[linear] / scale.float().to(self.effective[linear].device)

    def apply(self) -> None:
        """``amax = max_j e_j`` for every recorded linear; one never called keeps its amax (warned)."""
        for linear in self.linears:
            if linear in self.effective:
                linear.input_quantizer.set_amax(self.effective[linear].amax())
        unseen = len(self.linears) - len(self.effective)
        if unseen:
            logger.warning("%d linear(s) saw no calibration data; their input quantizers keep their amax "
                           "(none: dynamic)", unseen)
