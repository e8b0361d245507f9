"""Repeated blocks: the nn.ModuleLists of blocks holding quantizable weights, whatever their attribute path.

A *block stack* is an nn.ModuleList, not inside another stack, whose every entry is a block (a module
that is not itself a quantizable weight) holding at least one record of ``lowbit.structure.weights``:
Llama's ``model.layers``, GPT-2's ``transformer.h``, BERT's ``encoder.layer``, OPT's
``model.decoder.layers``, T5's ``encoder.block`` and ``decoder.block`` (two stacks, in definition
order). MoE experts kept as a ModuleList inside each layer are inside a stack, so they are no stack.
A model without one (a CNN) has none: block-wise algorithms say so (:func:`require_block_stacks`).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lowbit.structure.weights import is_weight_module, quantizable_weights

HoldsWeights = Callable[[nn.Module], bool]


def holds_quantized_weights(module: nn.Module) -> bool:
    return bool(quantizable_weights(module))


def find_block_stacks(model: nn.Module,
                      holds: HoldsWeights = holds_quantized_weights) -> list[tuple[str, nn.ModuleList]]:
    """(name, ModuleList) of every block stack of ``model`` (module docstring), in definition order.
    ``holds(block)`` says whether a block holds weights to work on (default: quantized records)."""
    stacks: list[tuple[str, nn.ModuleList]] = []
    for name, modules in model.named_modules():
        if not isinstance(modules, nn.ModuleList) or not len(modules):
            continue
        if any(name.startswith(f"{outer}.") for outer, _ in stacks):
            continue
        if all(not is_weight_module(block) and holds(block) for block in modules):
            stacks.append((name, modules))
    return stacks


def require_block_stacks(model: nn.Module, description: str,
                         holds: HoldsWeights = holds_quantized_weights) -> list[tuple[str, nn.ModuleList]]:
    """:func:`find_block_stacks`, or a ValueError saying that ``description`` works block by block."""
    stacks = find_block_stacks(model, holds)
    if not stacks:
        raise ValueError(
            f"{description} works block by block, and {type(model).__name__} has no repeated blocks (decoder "
            "layers): no nn.ModuleList whose every entry is a block holding quantized weights (was the model "
            "quantized? a model without such blocks, e.g. a CNN, takes max calibration)"
        )
    return stacks
