"""TensorQuantizer: an nn.Module that applies one number format to a tensor.

A quantizer has three switches, ModelOpt's: enabled (else it returns its input), quant (fake-quantize)
and calib (feed a calibrator). With no calibrated ``amax`` it quantizes dynamically, from each input.

The format's math lives in ``lowbit.formats``; this module only chooses the granularity. It reshapes
the input into a *view* in which ``amax`` is one reduction:

- per-tensor: reduce every dim, ``amax`` is a scalar;
- per-channel (``axis=a``): keep dims ``a``, reduce the rest (keepdim), e.g. ``(out, 1)`` for a weight;
- block (``block_sizes={-1: 128}``): ``(..., K)`` becomes ``(..., K/128, 128)`` and the block dim is
  reduced, ``amax`` has shape ``(..., K/128, 1)``.

Fake quantization has a clip-aware straight-through gradient: d out / d x = 1 where x lies inside the
representable range ``[lo, hi]`` (``[-amax, amax]`` for symmetric formats) and 0 outside; with
``learn_amax=True`` the clipped elements send their gradient to ``amax`` (PACT).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lowbit import distributed, formats
from lowbit.attributes import QuantizerAttributeConfig

STATE_BUFFERS = ("amax", "amin", "pre_quant_scale", "block_amax")
PER_TENSOR = QuantizerAttributeConfig()


def _as_config(config: QuantizerAttributeConfig | dict | None) -> QuantizerAttributeConfig:
    if config is None:
        return QuantizerAttributeConfig()
    if isinstance(config, QuantizerAttributeConfig):
        return config
    if isinstance(config, dict):
        return QuantizerAttributeConfig.from_dict(config)
    raise TypeError(f"config={config!r}: expected a QuantizerAttributeConfig, a dict or None")


class BlockView:
    """The reshape that turns ``amax`` computation into one reduction (see the module docstring)."""

    def __init__(self, config: QuantizerAttributeConfig, shape: torch.Size):
        self.shape = shape
        ndim = len(shape)
        self.splits: list[tuple[int, int, int]] = []  # (axis, n_blocks, block_size), descending axis
        if config.block_sizes is not None:
            for axis, size in sorted(config.block_axes.items(), key=lambda kv: -(kv[0] % max(ndim, 1))):
                if not -ndim <= axis < ndim:
                    raise ValueError(
                        f"block_sizes axis {axis} is out of range for a tensor of shape {tuple(shape)}"
                    )
                axis %= ndim
                length = shape[axis]
                size = length if size is None else size
                if length % size:
                    raise ValueError(
                        f"block_sizes[{axis}]={size} does not divide dim {axis} of length {length} "
                        f"(shape {tuple(shape)}); choose a block size that divides it"
                    )
                self.splits.append((axis, length // size, size))
            reduce_dims = []
            for axis, _, _ in self.splits:  # descending axes: later splits never shift earlier ones
                reduce_dims = [d + 1 for d in reduce_dims] + [axis + 1]
            self.reduce_dims = tuple(sorted(reduce_dims))
        elif config.axis is None:
            self.reduce_dims = tuple(range(ndim))
        else:
            kept = (config.axis,) if isinstance(config.axis, int) else config.axis
            for axis in kept:
                if not -ndim <= axis < ndim:
                    raise ValueError(f"axis={config.axis} is out of range for a tensor of shape {tuple(shape)}")
            kept = {a % ndim for a in kept}
            self.reduce_dims = tuple(d for d in range(ndim) if d not in kept)
            if not self.reduce_dims:
                raise ValueError(
                    f"axis={config.axis} keeps every dim of shape {tuple(shape)}, leaving nothing to reduce "
                    "into an amax; keep fewer axes"
                )

    def to_view(self, x: torch.Tensor) -> torch.Tensor:
        for axis, n_blocks, size in self.splits:
            x = x.unflatten(axis, (n_blocks, size))
        return x

    def from_view(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.shape)


class TensorQuantizer(nn.Module):
    """Fake-quantizes tensors in one format; calibrates and holds ``amax``.

    ``q = TensorQuantizer(QuantizerAttributeConfig(num_bits=4, block_sizes={-1: 128})); y = q(x)``.

    Buffers: ``amax`` (float32, shape of the reduced view, absent until calibrated), ``amin``
    (asymmetric only), ``pre_quant_scale`` (per input channel, multiplies x before quantizing;
    set by SmoothQuant / AWQ) and ``block_amax`` (NVFP4 / MX weights only: per-block maxima chosen by a
    scale search, ``lowbit.formats.scale_search``, used in place of each block's own).
    """

    def __init__(self, config: QuantizerAttributeConfig | dict | None = None):
        super().__init__()
        self.config = _as_config(config)
        self._enabled = self.config.enable
        self._quant = True
        self._calib = False
        self._calibrator = None
        self._reused: tuple | None = None  # (input key, output) inside reusing_outputs, else None
        self.chain_stage: int | None = None  # its index inside a SequentialQuantizer (set there), else None
        for name in STATE_BUFFERS:
            self.register_buffer(name, None)

    # ---- switches (ModelOpt's names) ---------------------------------------------------------------
    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def enable(self) -> None:
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    def enable_quant(self) -> None:
        self._quant = True

    def disable_quant(self) -> None:
        self._quant = False

    def enable_calib(self) -> None:
        """Start collecting statistics; existing statistics are dropped."""
        self._calib = True
        self._calibrator = None

    def disable_calib(self) -> None:
        self._calib = False

    @property
    def num_bits(self):
        return self.config.num_bits

    @property
    def axis(self):
        return self.config.axis

    @property
    def block_sizes(self):
        return self.config.block_sizes

    @property
    def needs_calibration(self) -> bool:
        """Enabled, with a static scale that has not been calibrated yet."""
        return self._enabled and not self.config.is_dynamic and self.amax is None

    def set_config(self, config: QuantizerAttributeConfig | dict) -> None:
        """Replace the attributes; calibrated state no longer applies and is dropped."""
        self.config = _as_config(config)
        self._enabled = self.config.enable
        self.reset_amax()

    # ---- amax -------------------------------------------------------------------------------------
    def reset_amax(self) -> None:
        self.amax = None
        self.amin = None
        self.block_amax = None
        self._calibrator = None

    def _amax_view(self, shape: torch.Size) -> BlockView:
        """The view in which ``amax`` is one reduction; NVFP4 keeps a per-tensor (global) amax."""
        if self.config.block_scale_bits == (4, 3):
            return BlockView(PER_TENSOR, shape)
        return BlockView(self.config, shape)

    def compute_amax(self, x: torch.Tensor) -> torch.Tensor:
        """max |x| at this quantizer's granularity: what max calibration gives for ``x`` alone."""
        view = self._amax_view(x.shape)
        data = view.to_view(self._scaled(x)).detach()
        high, low = data.amax(dim=view.reduce_dims, keepdim=True), data.amin(dim=view.reduce_dims, keepdim=True)
        return torch.maximum(high, -low).float()  # max |x| without an |x| copy of the tensor

    def set_amax(self, amax: torch.Tensor, amin: torch.Tensor | None = None) -> None:
        """Store ``amax`` (and ``amin``) as the calibrated state, float32, detached (a Parameter when
        ``learn_amax``); the shape must broadcast against this quantizer's view (0-dim for per-tensor)."""
        amax = amax.detach().float()
        if self.config.learn_amax:
            self.amax = None
            self._buffers.pop("amax", None)
            self.amax = nn.Parameter(amax)
        else:
            self.amax = amax
        self.amin = None if amin is None else amin.detach().float()

    def load_calib_amax(self) -> None:
        """Turn the collected statistics into ``amax`` (and ``amin`` when asymmetric).

        The calibration method and its options come from the ``calibrator`` attribute, not from here.
        """
        calibrated = self._calibrated_range(self._calibrator)
        if calibrated is not None:
            self.set_amax(*calibrated)

    def _calibrated_range(self, calibrator) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``(amax, amin)`` from one calibrator's statistics (``amin`` None unless asymmetric); None when it
        saw nothing. ValueError on a non-finite amax."""
        if calibrator is None:
            return None
        if self.config.keeps_amin:
            amin, amax = calibrator
            return amax, amin
        amax = calibrator.compute_amax()
        if amax is None:
            return None
        if not torch.isfinite(amax).all():
            raise ValueError(f"calibration produced a non-finite amax for {self.config.format_name}")
        return amax, None

    # ---- forward ----------------------------------------------------------------------------------
    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.pre_quant_scale is None else x * self.pre_quant_scale.to(x.dtype)

    def _collect(self, x: torch.Tensor) -> None:
        if self.config.is_dynamic:
            return
        view = self._amax_view(x.shape)
        data = view.to_view(x.detach()).float()
        if self.config.keeps_amin:
            amin = data.amin(dim=view.reduce_dims, keepdim=True)
            amax = data.amax(dim=view.reduce_dims, keepdim=True)
            if self._calibrator is not None:
                amin = torch.minimum(amin, self._calibrator[0])
                amax = torch.maximum(amax, self._calibrator[1])
            self._calibrator = (amin, amax)
            return
        if self._calibrator is None:
            from lowbit.calib import make_calibrator

            per_tensor = len(view.reduce_dims) == data.dim()
            self._calibrator = make_calibrator(
                self.config.calibrator,
                reduce_dims=None if per_tensor else view.reduce_dims,
                quant_fn=self.fake_quant_view,
                num_bits=self.config.num_bits,
                unsigned=self.config.unsigned,
            )
        self._calibrator.collect(data)

    def fake_quant_view(self, view: torch.Tensor, amax: torch.Tensor | None, amin=None) -> torch.Tensor:
        """Quantize-dequantize ``view`` (a tensor already in this quantizer's block view) with ``amax``
        (and ``amin`` when asymmetric or signed-scale) broadcast against it: the elementwise rule alone, no
        reshaping, no pre_quant_scale. GPTQ / AWQ call it on single columns; calibrators get it as ``quant_fn``."""
        cfg = self.config
        if self.chain_stage is not None and self._plain_grid():
            return self._chained_fake_quant_view(view, amax)
        if cfg.codebook is not None:
            return formats.fake_quant_codebook(view, amax, cfg.codebook)
        if cfg.is_float:
            return formats.fake_quant_fp(view, amax, formats.float_format(cfg.num_bits))
        if cfg.asymmetric:
            return formats.fake_quant_int_asym(view, amin, amax, cfg.num_bits)
        if cfg.signed_scale:
            return formats.fake_quant_int_signed_scale(view, amin, amax, cfg.num_bits)
        return formats.fake_quant_int(view, amax, cfg.num_bits, cfg.unsigned, cfg.narrow_range)

    def _plain_grid(self) -> bool:
        """A signed INT (full range) or FP grid scaled by amax alone: what a chain stage in divisor form handles
        (other stages keep their own rounding)."""
        cfg = self.config
        return (cfg.codebook is None and cfg.block_scale_bits is None
                and not (cfg.asymmetric or cfg.signed_scale or cfg.unsigned or cfg.narrow_range))

    def _chained_fake_quant_view(self, view: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        """A SequentialQuantizer's stage in the checkpoint's divisor form (``formats.steps``): the first stage's
        codes times its step, a later stage's ``round(x / step) * step``; ``step = amax / maxbound``."""
        cfg = self.config
        fmt = formats.float_format(cfg.num_bits) if cfg.is_float else cfg.num_bits
        maxbound = formats.grid_maxbound(fmt)
        step = formats.divisor_step(amax, maxbound)
        if self.chain_stage > 0:
            return formats.fake_quant_by_step(view, step, fmt).to(view.dtype)
        codes = (formats.quantize_fp(view, amax, fmt) if cfg.is_float else formats.quantize_int(view, amax, fmt))[0]
        return formats.dequantize_by_step(codes, step, maxbound).to(view.dtype)

    def fake_quant(self, x: torch.Tensor, amax: torch.Tensor | None = None) -> torch.Tensor:
        """``x * pre_quant_scale`` quantize-dequantized with ``amax`` (or the quantizer's own / a dynamic one)."""
        return self._quantize(self._scaled(x), amax)

    def _quantize(self, x: torch.Tensor, amax: torch.Tensor | None = None,
                  amin: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.config
        amax = self.amax if amax is None else amax
        amin = self.amin if amin is None else amin
        if cfg.block_scale_bits == (4, 3):
            return formats.fake_quant_nvfp4(x, global_amax=amax, block_amax=self.block_amax)
        if cfg.block_scale_bits == (8, 0):
            return formats.fake_quant_mx(x, formats.float_format(cfg.num_bits), block_size=cfg.block_axes[-1],
                                         block_amax=self.block_amax)
        view = BlockView(cfg, x.shape)
        data = view.to_view(x)
        if amax is None or cfg.is_dynamic:
            detached = data.detach()
            amax = detached.abs().amax(dim=view.reduce_dims, keepdim=True)
            if cfg.keeps_amin:
                amin = detached.amin(dim=view.reduce_dims, keepdim=True)
                amax = detached.amax(dim=view.reduce_dims, keepdim=True)
        quantized = self.fake_quant_view(data, amax, amin)
        if torch.is_grad_enabled() and (x.requires_grad or isinstance(amax, nn.Parameter)):
            quantized = _clip_aware_ste(data, quantized, *self._range(amax, amin))
        return view.from_view(quantized)

    def _range(self, amax: torch.Tensor, amin: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config.asymmetric:
            return amin, amax
        if self.config.signed_scale:  # the grid's own ends: qmin and qmax times its signed step
            bits = self.config.num_bits
            return formats.signed_scale_range(-formats.signed_scale_extreme(amin, amax) / 2 ** (bits - 1), bits)
        if self.config.unsigned:
            return torch.zeros_like(amax), amax
        return -amax, amax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x * pre_quant_scale`` (always, as in ModelOpt: folded scales must keep the float output), then
        statistics in calib mode and fake quantization in quant mode. Inside :func:`reusing_outputs`, the
        output for the same unmodified input tensor is returned again instead of recomputed."""
        if self._reused is None or torch.is_grad_enabled():
            return self._forward(x)
        key = _tensor_key(x)
        if self._reused[0] != key:
            self._reused = (key, self._forward(x))
        return self._reused[1]

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_floating_point(x):
            raise TypeError(f"TensorQuantizer input has dtype {x.dtype}; a floating-point tensor is required")
        x = self._scaled(x)
        if not self._enabled:
            return x
        if self._calib:
            self._collect(x)
        if not self._quant:
            return x
        out = self._quantize(x)
        if self.config.block_scale_bits is not None and torch.is_grad_enabled() and x.requires_grad:
            out = x + (out - x).detach()  # NVFP4 / MX: plain straight-through gradient
        return out.to(x.dtype)

    # ---- state ------------------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name in STATE_BUFFERS:
            key = prefix + name
            if key in state_dict and getattr(self, name) is None:
                value = state_dict[key]
                if name == "amax" and self.config.learn_amax:
                    self.set_amax(value)
                else:
                    setattr(self, name, torch.empty_like(value, device=self._device_hint()))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _device_hint(self) -> torch.device:
        for tensor in list(self.parameters()) + list(self.buffers()):
            return tensor.device
        return torch.device("cpu")

    def extra_repr(self) -> str:
        if not self._enabled:
            return "disabled"
        text = f"{self.config.format_name} {self.config.granularity}"
        if self.amax is not None:
            amax = self.amax.detach()
            text += f" amax={amax.item():.4g}" if amax.numel() == 1 else f" amax[{tuple(amax.shape)}]"
            text += f" max={amax.max().item():.4g}" if amax.numel() > 1 else ""
        elif not self.config.is_dynamic:
            text += " (uncalibrated: dynamic)"
        if self.pre_quant_scale is not None:
            text += " pre_quant_scale"
        if self._calib:
            text += " calibrating"
        return text


@contextmanager
def collecting_statistics(quantizers: list[TensorQuantizer], across_ranks: bool = True) -> Iterator[None]:
    """Calibration mode for ``quantizers`` while the block runs, then ``amax`` from what they saw.

    Quantization is off inside the block (statistics see unquantized inputs); on exit, even on error, the
    quantizers are back in quant mode. ``amax`` is loaded only when the block finished normally. Inside
    ``lowbit.distributed.calibrating_across`` (and with ``across_ranks``) the ranges are then combined over
    ranks (:func:`_combine_across_ranks`); weights, the same on every rank, pass ``across_ranks=False``.
    """
    across_ranks = across_ranks and distributed.is_active()
    if across_ranks:
        _check_combinable(quantizers)
    for quantizer in quantizers:
        quantizer.enable_calib()
        quantizer.disable_quant()
    try:
        yield
        if across_ranks:
            seen = [_saw_data(quantizer) for quantizer in quantizers]
        for quantizer in quantizers:
            quantizer.load_calib_amax()
        if across_ranks:
            _combine_across_ranks(quantizers, seen)
    finally:
        for quantizer in quantizers:
            quantizer.disable_calib()
            quantizer.enable_quant()


def _check_combinable(quantizers: list[TensorQuantizer]) -> None:
    """ValueError for a static quantizer whose calibrator keeps a distribution rather than a running range:
    its statistics cannot be combined over ranks by a max."""
    for quantizer in quantizers:
        config = quantizer.config
        method = config.calibrator["method"] if isinstance(config.calibrator, dict) else config.calibrator
        if not config.is_dynamic and not config.asymmetric and method != "max":
            raise ValueError(f"calibrator {method!r} ({config.format_name}) cannot be combined over ranks "
                             "(distributed calibration takes max calibrators and asymmetric min/max ranges)")


def _saw_data(quantizer: TensorQuantizer) -> bool:
    """Whether ``quantizer`` collected anything in this calibration (a view of an expert quantizer, which
    collects into its parent, counts as having seen data when it has an amax)."""
    calibrator = getattr(quantizer, "_calibrator", None) if "_calibrator" in quantizer.__dict__ else quantizer.amax
    return calibrator is not None


def _combine_across_ranks(quantizers: list[TensorQuantizer], seen: list[bool]) -> None:
    """Each quantizer's ``amax`` becomes the max over ranks (``amin`` the min), from the ranks that saw data."""
    maxima = distributed.elementwise_max([q.amax if s else None for q, s in zip(quantizers, seen, strict=True)])
    minima = distributed.elementwise_max([q.amin if s else None for q, s in zip(quantizers, seen, strict=True)],
                                         minimum=True)
    for quantizer, amax, amin in zip(quantizers, maxima, minima, strict=True):
        if amax is not None:
            quantizer.set_amax(amax, amin)


@contextmanager
def quantization_off(quantizers: list[TensorQuantizer | SequentialQuantizer]) -> Iterator[None]:
    """``quantizers`` pass their input through (times pre_quant_scale) while the block runs; each is back in
    the quant mode it had on exit, even on error. Calibration uses it for the weights: activation
    statistics then come from the float model, as ModelOpt's, and no weight is fake-quantized per batch."""
    stages = [s for q in quantizers for s in (q if isinstance(q, SequentialQuantizer) else [q])]
    was_quantizing = [stage._quant for stage in stages]
    for stage in stages:
        stage.disable_quant()
    try:
        yield
    finally:
        for stage, quantizing in zip(stages, was_quantizing, strict=True):
            if quantizing:
                stage.enable_quant()


@contextmanager
def reusing_outputs(quantizers: list[TensorQuantizer | SequentialQuantizer]) -> Iterator[None]:
    """While the block runs (under no_grad), each quantizer computes its output once per input tensor and
    returns it again for the same tensor: same storage, shape, strides and version (an in-place change
    of the tensor bumps its version). For weights during a calibration pass: one fake quantization per
    pass instead of one per batch, for one kept copy of each output. The quantizers' own state (amax,
    switches) must not change inside the block."""
    stages = [s for q in quantizers for s in (q if isinstance(q, SequentialQuantizer) else [q])]
    for stage in stages:
        stage._reused = (None, None)
    try:
        yield
    finally:
        for stage in stages:
            stage._reused = None


def _tensor_key(x: torch.Tensor) -> tuple:
    return (x.data_ptr(), x.shape, x.stride(), x.dtype, x.device, x._version)


def _clip_aware_ste(x: torch.Tensor, quantized: torch.Tensor, low: torch.Tensor, high: torch.Tensor):
    """Value of ``quantized``; gradient 1 inside [low, high] and 0 outside (to the bounds if learnable)."""
    clipped = torch.clamp(x, min=low.to(x.dtype), max=high.to(x.dtype))
    return clipped + (quantized - clipped).detach()


class SequentialQuantizer(nn.Sequential):
    """Several TensorQuantizers applied in order (ModelOpt's W4A8: INT4 blocks, then FP8 per tensor).

    Its stages compute in the divisor form a checkpoint stores (``formats.steps``: the first stage's codes times
    ``amax / maxbound``, each later stage ``round(x / step) * step``), so an export's loader, which has only those
    steps, rebuilds the same weight bit for bit (an ulp's difference at an exact midpoint moves a whole code)."""

    def __init__(self, *quantizers: TensorQuantizer):
        super().__init__(*quantizers)
        for index, quantizer in enumerate(quantizers):  # the stages compute in a checkpoint's divisor form
            quantizer.chain_stage = index

    def _each(self, method: str) -> Callable[[], None]:
        def call(*args, **kwargs) -> None:
            for quantizer in self:
                getattr(quantizer, method)(*args, **kwargs)

        return call

    def __getattr__(self, name: str):
        if name in {"enable", "disable", "enable_quant", "disable_quant", "enable_calib", "disable_calib",
                    "load_calib_amax", "reset_amax"}:
            return self._each(name)
        return super().__getattr__(name)

    @property
    def is_enabled(self) -> bool:
        return any(q.is_enabled for q in self)

    @property
    def needs_calibration(self) -> bool:
        return any(q.needs_calibration for q in self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The stages in order, each on the previous one's float32 output, cast to ``x``'s dtype once at the end.

        Rounding between stages to a bf16 model's dtype would round W4A8's INT4 values (code * step) to bf16 before
        the FP8 stage: a double rounding that moves ~3 % of the FP8 codes one step (1.1 % of the weight, measured
        on the bundled model) away from the export's ``fp8(code * step)``, which is what engines compute with."""
        y = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
        for quantizer in self:
            y = quantizer(y)
        return y.to(x.dtype)

    def fake_quant(self, x: torch.Tensor, amax: torch.Tensor | None = None) -> torch.Tensor:
        """``forward``'s chain without calibration (``amax`` for the first stage)."""
        y = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
        for index, quantizer in enumerate(self):
            y = quantizer.fake_quant(y, amax if index == 0 else None)
        return y.to(x.dtype)

    def compute_amax(self, x: torch.Tensor) -> torch.Tensor:
        return self[0].compute_amax(x)
