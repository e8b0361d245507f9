"""ExpertQuantizer: one TensorQuantizer's format applied to E experts, each with its own statistics.

Fused MoE experts keep their weights as one ``(E, out, in)`` tensor and run each expert on the tokens
routed to it. An ExpertQuantizer has the attributes of a TensorQuantizer for one expert's 2-D tensor
(``axis=0`` is per output channel, ``block_sizes={-1: 128}`` groups the input dim, NVFP4 blocks of 16
with a per-expert global amax) and keeps every piece of state stacked on a leading expert axis:

- ``amax`` / ``amin``: ``(E, *a)`` where ``a`` is the shape one expert's amax has at that granularity
  (``()`` per tensor, ``(out, 1)`` per channel, ``(out, in / b, 1)`` for blocks);
- ``pre_quant_scale``: ``(E, in)`` (AWQ's per-expert input scale);
- one calibrator per expert.

``q(w)`` with ``w`` of shape ``(E, ...)`` gives ``stack_e(TensorQuantizer_e(w[e]))``, where
``TensorQuantizer_e`` is this format with ``amax[e]``, ``amin[e]``, ``pre_quant_scale[e]`` and the
calibrator of expert ``e``; ``q(x, expert=e)`` gives ``TensorQuantizer_e(x)`` for the tokens of
expert ``e``. Every format and calibrator therefore behaves per expert exactly as for one Linear.

Calibration: ``load_calib_amax`` stacks the experts' amax. An expert whose calibrator saw no token
(a *starved* expert) gets the elementwise maximum of its siblings' amax (minimum for ``amin``), as
ModelOpt syncs expert input amax; its index goes to ``starved_experts`` (the caller warns with the
module's name). When no expert saw a token, nothing is loaded (the quantizer stays dynamic).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lowbit.attributes import QuantizerAttributeConfig
from lowbit.quantizer import SequentialQuantizer, TensorQuantizer


class ExpertQuantizer(TensorQuantizer):
    """A TensorQuantizer over ``num_experts`` experts (see the module docstring)."""

    def __init__(self, config: QuantizerAttributeConfig | dict | None = None, num_experts: int = 1):
        super().__init__(config)
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts={num_experts!r}: expected a positive int")
        self.num_experts = num_experts
        self._expert: int | None = None  # the expert the current call quantizes, None for stacked input
        self._calibrators: list = [None] * num_experts
        self.starved_experts: list[int] = []

    @classmethod
    def from_quantizer(cls, quantizer: TensorQuantizer, num_experts: int) -> ExpertQuantizer:
        """An ExpertQuantizer with ``quantizer``'s attributes and switches (its state is per-tensor, not kept)."""
        expert = cls(quantizer.config, num_experts)
        expert._enabled, expert._quant = quantizer._enabled, quantizer._quant
        return expert.to(quantizer._device_hint())

    # ---- per-expert calls ---------------------------------------------------------------------------
    @contextmanager
    def _bound(self, expert: int) -> Iterator[None]:
        if not 0 <= expert < self.num_experts:
            raise IndexError(f"expert={expert}: this quantizer has {self.num_experts} experts")
        previous, self._expert = self._expert, expert
        try:
            yield
        finally:
            self._expert = previous

    def _each_expert(self, x: torch.Tensor, call) -> list:
        """``[call(x[e]) for each expert e]`` with expert ``e`` bound for each call."""
        if x.dim() < 1 or x.shape[0] != self.num_experts:
            raise ValueError(
                f"ExpertQuantizer over {self.num_experts} experts got a tensor of shape {tuple(x.shape)}: "
                "pass (num_experts, ...) stacked, or expert=e for one expert's tensor"
            )
        results = []
        for expert, part in enumerate(x.unbind(0)):
            with self._bound(expert):
                results.append(call(part))
        return results

    def _stacked(self, x: torch.Tensor, call) -> torch.Tensor:
        return torch.stack(self._each_expert(x, call))

    def _slice(self, state: torch.Tensor | None) -> torch.Tensor | None:
        return None if state is None or self._expert is None else state[self._expert]

    def forward(self, x: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        """Stacked ``x`` (E, ...) when ``expert`` is None (outputs reused as TensorQuantizer's), else the
        tensor of expert ``expert`` alone."""
        if expert is None:
            return super().forward(x)
        with self._bound(expert):
            return super()._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._expert is None:
            return self._stacked(x, super()._forward)
        return super()._forward(x)

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_quant_scale is None:
            return x
        if self._expert is None:
            return self._stacked(x, self._scaled)
        return x * self.pre_quant_scale[self._expert].to(x.dtype)

    def _collect(self, x: torch.Tensor) -> None:
        if self._expert is None:
            self._each_expert(x, self._collect)
            return
        self._calibrator = self._calibrators[self._expert]
        try:
            super()._collect(x)
            self._calibrators[self._expert] = self._calibrator
        finally:
            self._calibrator = None

    def _quantize(self, x: torch.Tensor, amax: torch.Tensor | None = None,
                  amin: torch.Tensor | None = None) -> torch.Tensor:
        if self._expert is None:
            return self._stacked(x, lambda part: self._quantize(
                part, None if amax is None else amax[self._expert], None if amin is None else amin[self._expert]))
        amax = self._slice(self.amax) if amax is None else amax
        amin = self._slice(self.amin) if amin is None else amin
        return super()._quantize(x, amax, amin)

    def compute_amax(self, x: torch.Tensor) -> torch.Tensor:
        """Stacked ``(E, *a)`` amax of a stacked ``x``, or one expert's when bound (see ``expert``)."""
        if self._expert is None:
            return self._stacked(x, super().compute_amax)
        return super().compute_amax(x)

    # ---- calibration --------------------------------------------------------------------------------
    def enable_calib(self) -> None:
        super().enable_calib()
        self._calibrators = [None] * self.num_experts

    def reset_amax(self) -> None:
        super().reset_amax()
        self._calibrators = [None] * self.num_experts

    def load_calib_amax(self) -> None:
        """Stack each expert's calibrated range; starved experts take their siblings' (module docstring)."""
        ranges = [self._calibrated_range(calibrator) for calibrator in self._calibrators]
        seen = [r for r in ranges if r is not None]
        self.starved_experts = [e for e, r in enumerate(ranges) if r is None] if seen else []
        if not seen:
            return
        largest = torch.stack([amax for amax, _ in seen]).amax(dim=0)
        amax = torch.stack([largest if r is None else r[0] for r in ranges])
        amin = None
        if self.config.keeps_amin:
            smallest = torch.stack([low for _, low in seen]).amin(dim=0)
            amin = torch.stack([smallest if r is None else r[1] for r in ranges])
        self.set_amax(amax, amin)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()} x{self.num_experts} experts"

    def expert(self, index: int) -> ExpertQuantizerView:
        """This quantizer as seen by expert ``index``: a TensorQuantizer over that expert's 2-D tensor whose
        state is slice ``index`` of the stacked state (reads and writes go through)."""
        if not 0 <= index < self.num_experts:
            raise IndexError(f"expert={index}: this quantizer has {self.num_experts} experts")
        return ExpertQuantizerView(self, index)


def _stacked_state(name: str):
    """A property reading slice ``index`` of the parent's stacked buffer ``name`` and writing into it. Writing
    to a parent without that state creates it with the written value for every expert (pre_quant_scale: ones
    for the others, and an expert whose pre_quant_scale is all ones reads as None: unscaled), so no expert is
    left without a defined value."""

    def get(view: ExpertQuantizerView) -> torch.Tensor | None:
        stacked = getattr(view.parent, name)
        if stacked is None:
            return None
        mine = stacked[view.index]
        return None if name == "pre_quant_scale" and bool((mine == 1).all()) else mine

    def set_(view: ExpertQuantizerView, value: torch.Tensor | None) -> None:
        parent = view.parent
        stacked = getattr(parent, name)
        if value is None:  # TensorQuantizer.set_amax clears amin of a symmetric quantizer: nothing to do
            if stacked is not None:
                raise ValueError(f"cannot clear one expert's {name}; reset the ExpertQuantizer itself")
            return
        value = value.detach().float()
        if stacked is None:
            fill = torch.ones_like(value) if name == "pre_quant_scale" else value
            stacked = fill.unsqueeze(0).repeat(parent.num_experts, *[1] * value.dim()).contiguous()
        elif value.numel() == stacked[view.index].numel():
            value = value.reshape(stacked[view.index].shape)
        stacked = stacked.clone() if isinstance(stacked, torch.nn.Parameter) else stacked
        with torch.no_grad():
            stacked[view.index] = value.to(stacked.device)
        setattr(parent, name, stacked)

    return property(get, set_)


class ExpertQuantizerView(TensorQuantizer):
    """One expert's share of an ExpertQuantizer, with the TensorQuantizer API (``ExpertQuantizer.expert``).

    ``config``, the switches, ``amax`` / ``amin`` / ``pre_quant_scale`` / ``block_amax`` are the parent's (state: slice
    ``index``); ``compute_amax``, ``fake_quant``, ``fake_quant_view`` and ``set_amax`` run TensorQuantizer's
    code on that state; calling it quantizes the expert's tensor through the parent; calibrating it collects
    into the parent's calibrator of that expert and loads that expert's slice. For algorithms written for one
    ``(out, in)`` weight and its quantizer (AWQ, GPTQ, ...).
    """

    amax = _stacked_state("amax")
    amin = _stacked_state("amin")
    pre_quant_scale = _stacked_state("pre_quant_scale")
    block_amax = _stacked_state("block_amax")

    def __init__(self, parent: ExpertQuantizer, index: int):
        nn.Module.__init__(self)
        object.__setattr__(self, "parent", parent)  # not a submodule: the view owns nothing
        self.index = index

    @property
    def config(self) -> QuantizerAttributeConfig:
        return self.parent.config

    @property
    def chain_stage(self) -> int | None:
        """Its index in a SequentialQuantizer of views (set there), else the parent's."""
        return self.__dict__.get("_chain_stage", self.parent.chain_stage)

    @chain_stage.setter
    def chain_stage(self, index: int | None) -> None:
        self.__dict__["_chain_stage"] = index

    @property
    def _enabled(self) -> bool:
        return self.parent._enabled

    @_enabled.setter
    def _enabled(self, value: bool) -> None:
        self.parent._enabled = value

    @property
    def _calib(self) -> bool:
        return self.parent._calib

    @property
    def _quant(self) -> bool:
        return self.parent._quant

    @_quant.setter
    def _quant(self, value: bool) -> None:
        self.parent._quant = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.parent(x, expert=self.index)

    def enable_calib(self) -> None:
        """Calibrate this expert alone: the parent collects (its other experts' statistics are kept)."""
        self.parent._calib = True
        self.parent._calibrators[self.index] = None

    def disable_calib(self) -> None:
        self.parent._calib = False

    def load_calib_amax(self) -> None:
        calibrated = self.parent._calibrated_range(self.parent._calibrators[self.index])
        if calibrated is not None:
            self.set_amax(*calibrated)

    def extra_repr(self) -> str:
        return f"expert {self.index} of {self.parent.extra_repr()}"


def per_expert(quantizer: TensorQuantizer | SequentialQuantizer, num_experts: int):
    """``quantizer`` (or each stage of a SequentialQuantizer) as an ExpertQuantizer over ``num_experts``;
    an ExpertQuantizer with that many experts is returned as is."""
    if isinstance(quantizer, SequentialQuantizer):
        return SequentialQuantizer(*(per_expert(stage, num_experts) for stage in quantizer))
    if isinstance(quantizer, ExpertQuantizer) and quantizer.num_experts == num_experts:
        return quantizer
    return ExpertQuantizer.from_quantizer(quantizer, num_experts)


def quantize_expert_input(quantizer: TensorQuantizer | SequentialQuantizer, x: torch.Tensor,
                          expert: int) -> torch.Tensor:
    """``quantizer`` applied to the tokens routed to ``expert`` (each stage in turn when sequential)."""
    stages = list(quantizer) if isinstance(quantizer, SequentialQuantizer) else [quantizer]
    for stage in stages:
        x = stage(x, expert=expert)
    return x
