"""quantize(): insert quantizers from a config, then calibrate. Validation happens before any mutation.

``quantize(model, config, forward_loop)``:
1. parse the config; plan every supported module's quantizer attributes; check weight shapes against
   block sizes and that activation statistics have a ``forward_loop`` — all before touching the model;
2. swap each supported module's class for its quantized class (``lowbit.modules``);
3. calibrate with the config's algorithm. If anything raises in 2-3, the conversion is undone.
"""

from __future__ import annotations

import fnmatch
import logging
import warnings
from collections.abc import Callable

import torch
from torch import nn

from lowbit.algorithms.registry import DATA_FREE, run_algorithm
from lowbit.attributes import QuantizerAttributeConfig
from lowbit.calibration import ForwardLoop, Quantizer, iter_quantizers, max_calibrate
from lowbit.config import QuantizeConfig, check_calibrate_all_experts, parse_config
from lowbit.modules import convert_module, is_quantized, revert_module
from lowbit.modules.experts import routing_all_tokens, warn_starved_experts
from lowbit.modules.registry import quantized_class_for
from lowbit.quantizer import BlockView, SequentialQuantizer, TensorQuantizer
from lowbit.rotation.options import apply_rotation, check_rotation_options
from lowbit.structure.blocks import require_block_stacks
from lowbit.structure.coverage import coverage_summary, warn_uncovered, weight_coverage
from lowbit.structure.weights import weights_by_slot

logger = logging.getLogger("lowbit")


def _parent_classes(module: nn.Module) -> tuple[str, ...]:
    original = type(module).original_class if is_quantized(module) else type(module)
    return tuple(cls.__name__ for cls in original.__mro__)


def _plan(model: nn.Module, config: QuantizeConfig):
    """[(module, slot, attributes)] for every supported module, validated against its weight."""
    plan = []
    for name, module in model.named_modules():
        quantized_cls = type(module) if is_quantized(module) else quantized_class_for(module)
        if quantized_cls is None:
            continue
        parents = _parent_classes(module)
        weights = weights_by_slot(module, quantized_cls)
        for slot in quantized_cls.quantizer_names:
            full_name = f"{name}.{slot}" if name else slot
            attributes = config.attributes_for(full_name, parents)
            if slot in weights and attributes is not None:
                weight = weights[slot]  # stacked expert weights (E, out, in): each expert is quantized alone
                _check_weight_shape(weight[0] if getattr(quantized_cls, "stacked_weights", False) else weight,
                                    full_name, attributes)
            plan.append((name, module, slot, full_name, parents, attributes))
    return plan


def _check_weight_shape(weight: torch.Tensor, full_name: str, attributes) -> None:
    for config in attributes if isinstance(attributes, list) else [attributes]:
        try:
            BlockView(config, weight.shape)
        except ValueError as error:
            raise ValueError(f"{full_name}: {error}") from None


def _needs_activation_data(plan) -> bool:
    for *_, slot, _, _, attributes in plan:
        if slot.endswith("weight_quantizer") or attributes is None:
            continue
        configs = attributes if isinstance(attributes, list) else [attributes]
        if any(not c.is_dynamic for c in configs):
            return True
    return False


def _make_quantizer(attributes) -> Quantizer:
    if attributes is None:
        quantizer = TensorQuantizer(QuantizerAttributeConfig())
        quantizer.disable()
        return quantizer
    if isinstance(attributes, list):
        return SequentialQuantizer(*(TensorQuantizer(a) for a in attributes))
    return TensorQuantizer(attributes)


def quantize(model: nn.Module, config: dict | QuantizeConfig, forward_loop: ForwardLoop | None = None) -> nn.Module:
    """Insert quantizers into every supported module of ``model`` (in place) and calibrate them.

    ``config``: ModelOpt-style dict or QuantizeConfig (see ``lowbit.config``). ``forward_loop(model)``
    runs calibration data through the model; configs with static activation scales need it, weight-only
    configs do not. Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    config = parse_config(config)
    plan = _plan(model, config)
    if not plan:
        raise ValueError(
            f"{type(model).__name__} has no module lowbit can quantize (supported: nn.Linear, nn.Conv*, "
            "nn.ConvTranspose*, transformers Conv1D and registered classes; see lowbit.register)"
        )
    unmatched = config.unmatched_patterns([(full, parents) for _, _, _, full, parents, _ in plan])
    for pattern in unmatched:
        warnings.warn(f"quant_cfg pattern {pattern!r} matches no quantizer in the model", stacklevel=2)
    if config.algorithm not in (None, *DATA_FREE) and forward_loop is None:
        raise ValueError(f"forward_loop is None, but algorithm {config.algorithm!r} needs calibration data")
    if config.algorithm is not None and forward_loop is None and _needs_activation_data(plan):
        raise ValueError(
            "forward_loop is None, but the config quantizes activations with calibrated scales: pass "
            "forward_loop=lambda model: [model(**batch) for batch in batches] (see lowbit.data), or "
            "use a weight-only or dynamic config"
        )

    _check_blocks(model, plan, config.algorithm)

    converted, replaced = [], []
    try:
        for module in {id(module): module for _, module, *_ in plan}.values():
            if is_quantized(module):  # re-quantization: keep the old quantizers to put back on failure
                replaced += [(module, slot, getattr(module, slot)) for slot in module.quantizer_names]
            else:
                convert_module(module)
                converted.append(module)
        for _, module, slot, _, _, attributes in plan:
            setattr(module, slot, _make_quantizer(attributes).to(_module_device(module)))
        calibrate(model, config.algorithm, forward_loop, **config.algorithm_options)
    except BaseException:
        for module, slot, previous in replaced:
            setattr(module, slot, previous)
        for module in converted:
            revert_module(module)
        raise
    report_coverage(model)
    return model


def report_coverage(model: nn.Module) -> None:
    """Log what stayed float, by kind and bytes (``lowbit.structure.coverage``), and warn when more than
    20 % of the weight bytes stayed float with no rule saying so."""
    coverage = weight_coverage(model)
    logger.info("weights quantized, by kind:\n%s", coverage_summary(coverage))
    warn_uncovered(coverage, stacklevel=4)


def _check_blocks(model: nn.Module, plan, algorithm) -> None:
    """Block-wise algorithms need repeated blocks holding planned quantizers: a clear error before conversion."""
    name = algorithm.get("method") if isinstance(algorithm, dict) else algorithm
    if name in (None, *DATA_FREE):
        return
    planned = {id(module) for _, module, _, _, _, attributes in plan if attributes is not None}
    require_block_stacks(model, f"algorithm {name!r}",
                         holds=lambda block: any(id(m) in planned for m in block.modules()))


def _module_device(module: nn.Module) -> torch.device:
    for tensor in module.parameters(recurse=False):
        return tensor.device
    return torch.device("cpu")


def calibrate(model: nn.Module, algorithm: str | dict | None = "max", forward_loop: ForwardLoop | None = None,
              **options) -> nn.Module:
    """(Re-)calibrate an already quantized model with ``algorithm`` ("max", "smoothquant", "awq_lite", ...).

    Every method takes ``calibrate_all_experts`` (default False): fused MoE experts then see every calibration
    token for their statistics, outputs unchanged (``lowbit.modules.experts``); and ``rotate`` (default False):
    QuaRot's rotations, or SpinQuant's learned ones (``"spinquant"``), fused into the weights first
    (``lowbit.rotation.options``; float outputs unchanged).
    Experts that saw no token are named in a warning at the end. Layer-wise algorithms log each decoder
    layer's output MSE before and after on the ``lowbit`` logger.
    """
    if isinstance(algorithm, dict):
        options = {**{k: v for k, v in algorithm.items() if k != "method"}, **options}
        algorithm = algorithm.get("method")
    if algorithm is None:
        return model
    all_experts = options.pop("calibrate_all_experts", False)
    check_calibrate_all_experts(all_experts)
    rotation = check_rotation_options(options.pop("rotate", False))
    if rotation is not None:
        apply_rotation(model, rotation, forward_loop)
    with routing_all_tokens(model, all_experts):
        _run_calibration(model, algorithm, forward_loop, options)
    warn_starved_experts(model)
    return model


def _run_calibration(model: nn.Module, algorithm: str, forward_loop: ForwardLoop | None, options: dict) -> None:
    if algorithm == "max":
        max_calibrate(model, forward_loop)
        return
    report = run_algorithm(algorithm, model, forward_loop, options) or []
    for layer in report:
        logger.info("%s", layer.describe(algorithm))


def _select(model: nn.Module, pattern: str | Callable[[str], bool]) -> list[Quantizer]:
    match = pattern if callable(pattern) else (lambda name: fnmatch.fnmatchcase(name, pattern))
    return [q for name, q in iter_quantizers(model) if match(name)]


def disable_quantizer(model: nn.Module, pattern: str | Callable[[str], bool]) -> int:
    """Disable every quantizer whose full name matches; returns how many."""
    selected = _select(model, pattern)
    for quantizer in selected:
        quantizer.disable()
    return len(selected)


def enable_quantizer(model: nn.Module, pattern: str | Callable[[str], bool]) -> int:
    """Enable every quantizer whose full name matches; returns how many."""
    selected = _select(model, pattern)
    for quantizer in selected:
        quantizer.enable()
    return len(selected)


def fold_weight(model: nn.Module) -> nn.Module:
    """Write each fake-quantized weight into the module and disable its weight quantizer."""
    with torch.no_grad():
        for module in model.modules():
            for slot, weight in (weights_by_slot(module) if is_quantized(module) else {}).items():
                quantizer = getattr(module, slot, None)
                if quantizer is not None and quantizer.is_enabled:
                    weight.copy_(quantizer(weight))  # a view (Conv1D's transpose) writes the parameter
                    quantizer.disable()
    return model


def quant_summary(model: nn.Module) -> str:
    """One line per quantizer: name, then format, granularity and amax (or 'disabled')."""
    lines = []
    for name, quantizer in iter_quantizers(model):
        stages = list(quantizer) if isinstance(quantizer, SequentialQuantizer) else [quantizer]
        lines.append(f"{name:<60} " + " -> ".join(stage.extra_repr() for stage in stages))
    enabled = sum(q.is_enabled for _, q in iter_quantizers(model))
    lines.append(f"{enabled} of {len(lines)} quantizers enabled")
    return "\n".join(lines)


def print_quant_summary(model: nn.Module) -> None:
    print(quant_summary(model))
