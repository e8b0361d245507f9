"""The recorded calls of one block, replayed: hidden states plus the other arguments, one call per batch."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from lowbit.structure.weights import QuantizableWeight

CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")  # replayed calls use no cache


class StopForward(Exception):
    """Raised by a hook to skip the rest of a block's forward once the wanted input was seen."""


class LayerInputs:
    """The calls of one block, one per calibration batch: hidden states plus the other arguments."""

    def __init__(self, calls: list[tuple[tuple, dict]]) -> None:
        self.calls = calls
        self.ranges = None  # the block's measured InputRanges, while the layer-wise runner works on it
        self.targets = None  # the float model's outputs of the block, when the runner fits the block to them

    def __len__(self) -> int:
        return len(self.calls)

    def hidden_states(self, index: int) -> Tensor:
        args, kwargs = self.calls[index]
        return args[0] if args else kwargs["hidden_states"]

    def forward(self, layer: nn.Module) -> Iterator[Tensor]:
        """The block's output (hidden states) for each batch, computed lazily, under no_grad."""
        for args, kwargs in self.calls:
            with torch.no_grad():
                output = layer(*args, **kwargs)
            yield output[0] if isinstance(output, (tuple, list)) else output

    def replaced(self, hidden: list[Tensor]) -> LayerInputs:
        """The same calls with new hidden states (the previous block's outputs)."""
        calls = []
        for (args, kwargs), states in zip(self.calls, hidden, strict=True):
            if args:
                calls.append(((states, *args[1:]), kwargs))
            else:
                calls.append((args, {**kwargs, "hidden_states": states}))
        return LayerInputs(calls)

    def feed(self, layer: nn.Module, weights: dict[str, QuantizableWeight], on_input: Callable[[str, Tensor], None],
             stop_after: QuantizableWeight | None = None) -> None:
        """Run every batch through ``layer``; ``on_input(name, x)`` gets every input of ``weights``
        (``QuantizableWeight.observe_inputs``). With ``stop_after``, the rest of the block is skipped once
        that weight's input was seen."""
        def observer(name: str, weight: QuantizableWeight):
            def observe(x: Tensor) -> None:
                on_input(name, x.detach())
                if weight == stop_after:
                    raise StopForward

            return observe

        handles = [weight.observe_inputs(observer(name, weight)) for name, weight in weights.items()]
        try:
            for args, kwargs in self.calls:
                try:
                    with torch.no_grad():
                        layer(*args, **kwargs)
                except StopForward:
                    pass
        finally:
            for handle in handles:
                handle.remove()


def replayable_call(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A block's call arguments, detached, with its KV cache dropped (a replay must not append to it)."""
    kwargs = {key: (None if key in CACHE_KWARGS else value) for key, value in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return tuple(_detached(a) for a in args), {k: _detached(v) for k, v in kwargs.items()}


def _detached(value):
    return value.detach() if isinstance(value, Tensor) else value
