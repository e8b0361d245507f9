"""Layer-by-layer execution of calibration algorithms over a model's repeated blocks (``lowbit.structure``).

1. The weights are max-calibrated, and ``forward_loop`` records, with a forward pre-hook, the inputs of
   the first decoder layer for each batch. It runs through the whole model (``max_calibrate``: every
   activation quantizer gets its max amax) only when some static activation quantizer is not an
   analytic input quantizer of a linear in the decoder layers (``lowbit.algorithms.activation_ranges``);
   otherwise it stops at the first decoder layer.
2. Then for each decoder layer, in order:

   - the float output (the layer's quantizers disabled) is the reference; the algorithm's ``watch``
     hooks see this pass (AWQ takes its input statistics from it); without the full pass of step 1 it
     also measures the analytic input ranges (max calibration of the float layer's inputs);
   - the output with max calibration gives ``mse_max``; this pass measures the analytic input ranges
     as the quantized layer sees them;
   - the algorithm transforms the layer (input scalings rescale the measured ranges);
   - analytic input quantizers get ``amax`` from the measured ranges; other static activation
     quantizers, if any, are recalibrated in one more pass;
   - the output now gives ``mse_after``;
   - the next layer's inputs are the float outputs (``layer_inputs="float"``, the default: every layer
     is calibrated on the float model's activations, as ModelOpt's awq_lite and NNCF collect their
     statistics) or the quantized ones (``"quantized"``: errors propagate as they will at inference);
     ``"quantized_float_targets"`` feeds the quantized outputs too, but the block's reference (what its
     algorithm fits, ``LayerInputs.targets``, and what ``mse_max`` / ``mse_after`` measure against) is the float
     model's output of the block (the float block on the float model's inputs, one more pass): a block can then
     make up for the error of the blocks before it (auto-round's ``enable_quanted_input``).
     On the bundled model float inputs gave the lower perplexity for most algorithms (GPTQ + scale
     estimation INT4 d ppl 0.35 -> 0.21, NVFP4 AWQ 1.22 -> 1.12; W4A8 AWQ 0.92 -> 0.94).

   That is 3 passes of the layer (4 with non-analytic activation quantizers) besides the algorithm's
   own; within a pass each weight is fake-quantized once, not once per batch. Inside
   :func:`without_layer_errors` the two error passes are skipped where they only measure (no analytic
   input range recorded in them, float inputs for the next layer): the report's errors are then NaN.
3. Each quantized linear outside the blocks (an output head) is then a block of its own, on its inputs
   captured in one more run of ``forward_loop`` (the float model's with ``layer_inputs="float"``), as
   ModelOpt's awq_lite scales every quantized linear; other weights outside the blocks keep max
   calibration (a warning names them).

Only one decoder layer's statistics live at a time; the inputs of all batches for the current layer
are kept (as GPTQ and AWQ do).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from lowbit.algorithms.activation_ranges import InputRanges
from lowbit.calibration import (
    calibrate_weight,
    calibrate_weights,
    max_calibrate,
    static_activation_quantizers,
)
from lowbit.modules.registry import is_quantized
from lowbit.progress import progress
from lowbit.quantizer import TensorQuantizer, collecting_statistics, reusing_outputs
from lowbit.structure.blocks import require_block_stacks
from lowbit.structure.groups import row_weights
from lowbit.structure.inputs import LayerInputs, StopForward, replayable_call
from lowbit.structure.weights import QuantizableWeight, quantizable_weights, weights_by_slot

logger = logging.getLogger(__name__)

ForwardLoop = Callable[[nn.Module], None]


@dataclass
class LayerReport:
    """Mean squared error of one decoder layer's output against its float output, on the same inputs."""

    index: int
    name: str
    mse_max: float | None  # with max calibration, before the algorithm (None: not measured)
    mse_after: float  # after the algorithm

    def describe(self, algorithm: str) -> str:
        before = "" if self.mse_max is None else f"{self.mse_max:.4g} with max calibration -> "
        return f"{algorithm} layer {self.index} ({self.name}): output MSE {before}{self.mse_after:.4g}"


def capture_layer_inputs(model: nn.Module, first_layer: nn.Module, forward_loop: ForwardLoop,
                         full_pass: bool = True, calibrate: bool = True) -> LayerInputs:
    """Max-calibrate the weights (unless ``calibrate`` is False), and record ``first_layer``'s call
    arguments for each batch.

    ``full_pass``: ``forward_loop`` runs through the whole model to max-calibrate its activation
    quantizers too; otherwise (or when there are none) it runs only up to ``first_layer``.
    """
    calls: list[tuple[tuple, dict]] = []
    handle = first_layer.register_forward_pre_hook(
        lambda _module, args, kwargs: calls.append(replayable_call(args, kwargs)), with_kwargs=True)
    try:
        if full_pass:
            max_calibrate(model, forward_loop)
        elif calibrate:
            calibrate_weights(model)
        if not calls:  # no forward ran (weight-only, or no full pass asked)
            _run_until(first_layer, model, forward_loop, calls)
    finally:
        handle.remove()
    if not calls:
        raise ValueError("forward_loop ran no batch through the model's first decoder layer")
    return LayerInputs(calls)


def _run_until(first_layer: nn.Module, model: nn.Module, forward_loop: ForwardLoop, calls: list) -> None:
    """Run ``forward_loop`` only as far as ``first_layer``'s input: the loop gets a stand-in for ``model``
    (:class:`_UpToLayer`) whose every call stops there. A loop that needs the model's output (or
    anything the stand-in lacks) fails on it: then the whole loop runs on the model itself."""
    stop = first_layer.register_forward_pre_hook(_raise_stop)  # runs after the recording hook
    try:
        with torch.no_grad():
            forward_loop(_UpToLayer(model))
    except Exception:  # any failure of the short cut falls back to the full pass
        calls.clear()
        stop.remove()
        with torch.no_grad():
            forward_loop(model)
    finally:
        stop.remove()


def _raise_stop(_module, _args):
    raise StopForward


class _UpToLayer(nn.Module):
    """Stands for a model in a forward loop; each call runs it up to the hooked layer and returns None.
    Attributes it lacks (``config``, ``device`` ...) are the model's."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs) -> None:
        try:
            self.model(*args, **kwargs)
        except StopForward:
            pass

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)


def tensor_quantizers(module: nn.Module) -> list[TensorQuantizer]:
    return [m for m in module.modules() if isinstance(m, TensorQuantizer)]


@contextmanager
def quantizers_disabled(module: nn.Module):
    """Every quantizer inside ``module`` disabled for the duration (its float behaviour)."""
    enabled = [q for q in tensor_quantizers(module) if q.is_enabled]
    for quantizer in enabled:
        quantizer.disable()
    try:
        yield
    finally:
        for quantizer in enabled:
            quantizer.enable()


def weights_reused(module: nn.Module):
    """Within the block, each weight inside ``module`` is fake-quantized once (``reusing_outputs``)."""
    return reusing_outputs([getattr(m, slot) for m in module.modules() if is_quantized(m)
                            for slot in weights_by_slot(m)])


def calibrate_activations(layer: nn.Module, inputs: LayerInputs, skip: Iterable[TensorQuantizer] = ()) -> None:
    """Recalibrate the layer's static activation quantizers (inputs/outputs) but ``skip``, with their own
    calibrators, as ``max_calibrate`` does (quantized weights); no pass at all when none is left."""
    skipped = {id(q) for q in skip}
    quantizers = [
        q
        for module in layer.modules() if is_quantized(module)
        for slot in module.quantizer_names
        if slot not in weights_by_slot(module)
        for q in tensor_quantizers(getattr(module, slot))
        if q.is_enabled and not q.config.is_dynamic and id(q) not in skipped
    ]
    if not quantizers:
        return
    with weights_reused(layer), collecting_statistics(quantizers):
        for _ in inputs.forward(layer):
            pass


_MEASURE_ERRORS: ContextVar[bool] = ContextVar("lowbit_layer_errors", default=True)


@contextmanager
def without_layer_errors() -> Iterator[None]:
    """Layer-wise runs inside skip the passes that only measure each layer's ``mse_max`` / ``mse_after``
    (module docstring): for callers that discard the report (``lowbit.search``'s candidates)."""
    token = _MEASURE_ERRORS.set(False)
    try:
        yield
    finally:
        _MEASURE_ERRORS.reset(token)


class OutputStore(Protocol):
    """Where a block's outputs go, batch by batch (a list; ``lowbit.scale`` spills them to disk)."""

    def append(self, output: Tensor) -> None: ...
    def __getitem__(self, index: int) -> Tensor: ...
    def __len__(self) -> int: ...


def mean_squared_error(outputs: Iterator[Tensor], references: Sequence[Tensor], keep: OutputStore | None = None
                       ) -> float:
    """MSE (float64) over all batches of ``outputs`` vs ``references``; each output goes to ``keep`` if given."""
    total, count, batches = 0.0, 0, 0
    for output in outputs:
        reference = references[batches]
        total += float((output.double() - reference.double()).square().sum())
        count += output.numel()
        batches += 1
        if keep is not None:
            keep.append(output)
    if batches != len(references):
        raise ValueError(f"{batches} outputs for {len(references)} references")
    return total / max(count, 1)


LayerTransform = Callable[[nn.Module, LayerInputs], None]
LayerWatch = Callable[[nn.Module, LayerInputs], AbstractContextManager]


@dataclass(frozen=True)
class LayerPass:
    """What a layer-wise algorithm does to one block: ``transform(layer, inputs)``, and ``watch(layer, inputs)``
    entered around the block's float reference pass (None: nothing to watch)."""

    transform: LayerTransform
    description: str
    watch: LayerWatch | None = None


def run_layerwise(model: nn.Module, forward_loop: ForwardLoop, transform: LayerTransform, description: str,
                  watch: LayerWatch | None = None, layer_inputs: str = "float") -> list[LayerReport]:
    """Apply ``transform(layer, inputs)`` to each block of each block stack in turn (see the module
    docstring); ``watch(layer, inputs)``, when given, is entered around the block's float reference pass;
    ``layer_inputs`` ("float" or "quantized") says which outputs feed the next block."""
    if forward_loop is None:
        raise ValueError(f"{description} needs calibration data: forward_loop is None")
    check_layer_inputs(layer_inputs)
    stacks = require_block_stacks(model, description)
    was_training = model.training
    model.eval()
    report = []
    try:
        _warn_outside(model, stacks, description)
        full_pass = not ranges_measured_per_layer(model, stacks)
        for position, (stack_name, layers) in enumerate(stacks):
            # the first stack's inputs come with max calibration; a later stack's (T5's decoder) follow
            # the stacks before it, already transformed
            inputs = capture_layer_inputs(model, layers[0], forward_loop, full_pass and position == 0,
                                          calibrate=position == 0)
            report += _run_stack(stack_name, layers, inputs, transform, description, watch, layer_inputs, full_pass)
        report += _run_outside(model, stacks, forward_loop, LayerPass(transform, description, watch), layer_inputs,
                               full_pass)
    finally:
        model.train(was_training)
    return report


def _run_stack(stack_name: str, layers: nn.ModuleList, inputs: LayerInputs, transform: LayerTransform,
               description: str, watch: LayerWatch | None, layer_inputs: str, full_pass: bool) -> list[LayerReport]:
    report = []
    float_inputs = inputs if layer_inputs == QUANTIZED_FLOAT_TARGETS else None
    bar = progress(layers, desc=description, unit="layer")
    for index, layer in enumerate(bar):
        entry, outputs = calibrate_block(layer, inputs, LayerPass(transform, description, watch), layer_inputs,
                                         full_pass, LayerReport(index, f"{stack_name}.{index}", None, 0.0),
                                         float_inputs=float_inputs)
        report.append(entry)
        if not math.isnan(entry.mse_after):  # measured (without_layer_errors skips the passes that only measure)
            bar.set_postfix(mse_max=f"{entry.mse_max:.3g}", mse_after=f"{entry.mse_after:.3g}")
        if float_inputs is not None:
            float_inputs = float_inputs.replaced(inputs.targets)
        inputs = inputs.replaced(outputs)
        del outputs
    return report


def calibrate_block(layer: nn.Module, inputs: LayerInputs, step: LayerPass, layer_inputs: str, full_pass: bool,
                    entry: LayerReport, new_store: Callable[[], OutputStore] = list,
                    float_inputs: LayerInputs | None = None) -> tuple[LayerReport, OutputStore]:
    """One block of the layer-wise run (module docstring, step 2): its report (``entry`` with the measured
    errors) and the outputs that feed the next block, in a store from ``new_store``. ``float_inputs`` (the float
    model's inputs of the block) is needed by, and only by, ``layer_inputs="quantized_float_targets"``: the float
    outputs are then left in ``inputs.targets``."""
    if (layer_inputs == QUANTIZED_FLOAT_TARGETS) != (float_inputs is not None):
        raise ValueError(f"layer_inputs={layer_inputs!r} with{'out' if float_inputs is None else ''} the float "
                         f"model's block inputs: only {QUANTIZED_FLOAT_TARGETS!r} takes them (this runner "
                         f"allows {list(LAYER_INPUTS[:2])})")
    ranges = InputRanges(row_weights(layer).values())
    reference = new_store()
    with ExitStack() as float_pass:
        float_pass.enter_context(quantizers_disabled(layer))
        if step.watch is not None:
            float_pass.enter_context(step.watch(layer, inputs))
        if not full_pass:
            float_pass.enter_context(ranges.recording())
        for output in inputs.forward(layer):
            reference.append(output)
    if float_inputs is not None:
        reference = new_store()
        with quantizers_disabled(layer):
            for output in float_inputs.forward(layer):
                reference.append(output)
        inputs.targets = reference
    if not full_pass:
        ranges.apply()  # max calibration of the inputs, from the float layer's
    measure = _MEASURE_ERRORS.get() or bool(ranges.quantizers) or layer_inputs != "float"
    entry.mse_max = entry.mse_after = math.nan
    if measure:
        with weights_reused(layer), ranges.recording():
            entry.mse_max = mean_squared_error(inputs.forward(layer), reference)
    inputs.ranges = ranges
    step.transform(layer, inputs)
    ranges.apply()
    calibrate_activations(layer, inputs, skip=ranges.quantizers)
    outputs = None if layer_inputs == "float" else new_store()
    if measure:
        with weights_reused(layer):
            entry.mse_after = mean_squared_error(inputs.forward(layer), reference, keep=outputs)
    logger.info("%s %s: output MSE %.4g with max calibration, %.4g after", step.description, entry.name,
                entry.mse_max, entry.mse_after)
    return entry, reference if outputs is None else outputs


QUANTIZED_FLOAT_TARGETS = "quantized_float_targets"
LAYER_INPUTS = ("float", "quantized", QUANTIZED_FLOAT_TARGETS)


def check_layer_inputs(layer_inputs: str) -> str:
    if layer_inputs not in LAYER_INPUTS:
        raise ValueError(f"layer_inputs={layer_inputs!r}; allowed: {list(LAYER_INPUTS)}")
    return layer_inputs


def ranges_measured_per_layer(model: nn.Module, stacks: list[tuple[str, nn.ModuleList]]) -> bool:
    """True when every static activation quantizer of ``model`` is an analytic input quantizer of a linear
    inside the block stacks (``lowbit.algorithms.activation_ranges``): the runner then measures each from its layer's
    inputs and no full max-calibration pass is needed."""
    covered = {id(q) for _, layers in stacks for layer in layers
               for q in InputRanges(row_weights(layer).values()).quantizers}
    return all(id(q) in covered for q in static_activation_quantizers(model))


def layer_errors(model: nn.Module, forward_loop: ForwardLoop) -> list[LayerReport]:
    """Each block's output MSE (float64) against its float output on the same inputs, in one run of
    ``forward_loop``: every block call is replayed with its quantizers disabled. The inputs are the
    quantized model's (errors propagate as at inference). ``mse_max`` is None (not measured)."""
    named = [(f"{stack}.{index}", layer) for stack, layers in require_block_stacks(model, "layer_errors")
             for index, layer in enumerate(layers)]
    layers = [layer for _, layer in named]
    totals = [[0.0, 0] for _ in layers]
    replaying = False

    def compare(index: int, layer: nn.Module, args: tuple, kwargs: dict, output) -> None:
        nonlocal replaying
        if replaying:
            return
        replaying = True
        try:
            with torch.no_grad(), quantizers_disabled(layer):
                reference = next(LayerInputs([replayable_call(args, kwargs)]).forward(layer))
        finally:
            replaying = False
        quantized = output[0] if isinstance(output, (tuple, list)) else output
        totals[index][0] += float((quantized.double() - reference.double()).square().sum())
        totals[index][1] += quantized.numel()

    handles = [
        layer.register_forward_hook(
            lambda module, args, kwargs, output, index=index: compare(index, module, args, kwargs, output),
            with_kwargs=True)
        for index, layer in enumerate(layers)
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            forward_loop(model)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return [LayerReport(index, name, None, total / max(count, 1))
            for index, ((name, _), (total, count)) in enumerate(zip(named, totals, strict=True))]


def recalibrate_weights(weight: QuantizableWeight) -> None:
    """Recompute the static scales of ``weight``'s quantizer from the weight (after an algorithm changed it)."""
    calibrate_weight(weight.weight_quantizer, weight.weight.detach())


def _outside(model: nn.Module, stacks: list[tuple[str, nn.ModuleList]]) -> tuple[dict[str, nn.Module], list[str]]:
    """({name: module} of the row-reading quantized linears outside the blocks (an output head), the other
    quantized weights outside them)."""
    inside = {id(m) for _, layers in stacks for m in layers.modules()}
    outside = {n: w for n, w in quantizable_weights(model, enabled_only=True).items() if id(w.module) not in inside}
    names = {id(module): name for name, module in model.named_modules()}
    linears = {names[id(w.module)]: w.module for w in outside.values() if w.reads_rows and w.module is not model}
    others = [n for n, w in outside.items() if not (w.reads_rows and names[id(w.module)] in linears)]
    return linears, others


def _warn_outside(model: nn.Module, stacks: list[tuple[str, nn.ModuleList]], description: str) -> None:
    others = _outside(model, stacks)[1]
    if others:
        logger.warning("%s works on the repeated blocks and the linears outside them only; %d quantized weight(s) "
                       "keep max calibration: %s", description, len(others), ", ".join(others[:5]))


class _OwnBlock(nn.Module):
    """A linear as a block: the layer passes hook the block around the linears they trace."""

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, *args, **kwargs):
        return self.linear(*args, **kwargs)


def _run_outside(model: nn.Module, stacks: list[tuple[str, nn.ModuleList]], forward_loop: ForwardLoop,
                 step: LayerPass, layer_inputs: str, full_pass: bool) -> list[LayerReport]:
    """Each quantized linear outside the blocks (an output head, as ModelOpt's awq_lite and GPTQ also take it)
    as a block of its own, after the stacks: its inputs captured in one more run of ``forward_loop`` up to it,
    from the float model (``layer_inputs="float"``: every quantizer off meanwhile; AWQ's scales keep the float
    output) or from the quantized one."""
    report = []
    for index, (name, module) in enumerate(_outside(model, stacks)[0].items()):
        with quantizers_disabled(model) if layer_inputs == "float" else ExitStack():
            inputs = capture_layer_inputs(model, module, forward_loop, full_pass=False, calibrate=False)
        entry, _ = calibrate_block(_OwnBlock(module), inputs, step, "float", full_pass,
                                   LayerReport(index, name, None, 0.0))
        logger.info("%s", entry.describe(step.description))
        report.append(entry)
    return report
