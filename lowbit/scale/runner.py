"""``quantize_layerwise``: calibrate and pack a model one decoder block at a time, so that neither the accelerator
nor the host ever holds the whole model.

1. The model is built on the meta device from ``config.json`` (``lowbit.scale.shards``) and its quantizers are
   inserted (``lowbit.quantize`` without calibration); the modules outside the block stacks (embeddings, final
   norm, head, rotary embedding) get their weights on ``device``.
2. Each calibration batch runs up to the first decoder block, whose call is recorded: its hidden states go to an
   activation store (host memory within the budget, disk beyond: ``lowbit.scale.activations``), the other
   arguments (masks, position embeddings) stay on ``device``. The modules outside the blocks then move to the
   host: the device holds one block (and its inputs) from here on.
3. For each block in turn: its weights are read from the memory-mapped shards onto ``device``, weight-calibrated,
   and calibrated as the whole-model path does it (``max``: one pass with the activation quantizers collecting
   while the weights are fake-quantized, as ``lowbit.convert.max_calibrate``; a layer-wise algorithm:
   ``lowbit.algorithms.layerwise.calibrate_block``, the same step ``lowbit.quantize`` runs); its outputs, stored as
   above, are the next block's inputs. The block is then packed (``lowbit.compress``), written to its own file,
   and its weights go back to the meta device. A config with static activation quantizers that are not analytic
   input ranges (a KV-cache quantizer, a percentile calibrator) needs, before a layer-wise algorithm, the max
   calibration of the whole model: a first sweep over the blocks does it (weights read twice).
4. The modules outside the blocks are packed and written, the parts joined into ``save_compressed``'s directory
   with the source's config and tokenizer files (``lowbit.scale.output``).

The quantizers equal the whole-model path's (same inputs, same operations, block by block). Distributed
calibration (``lowbit.distributed.calibrating_across``) works here too: each rank passes its shard of the batches,
every rank calibrates every block, the first rank alone writes the output.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from lowbit import distributed
from lowbit.algorithms.layerwise import (
    QUANTIZED_FLOAT_TARGETS,
    LayerPass,
    LayerReport,
    calibrate_block,
    ranges_measured_per_layer,
    tensor_quantizers,
    weights_reused,
)
from lowbit.algorithms.registry import layer_pass
from lowbit.calibration import calibrate_weights, static_activation_quantizers
from lowbit.compress import compress
from lowbit.compress.convert import compressible_linears
from lowbit.compress.experts import compressible_experts
from lowbit.compress.loading import return_freed_host_memory
from lowbit.config import QuantizeConfig, parse_config
from lowbit.convert import quantize
from lowbit.files import atomic_directory, check_writable
from lowbit.modules import is_quantized
from lowbit.progress import progress
from lowbit.ptq.memory import return_large_frees
from lowbit.quantizer import collecting_statistics
from lowbit.scale.activations import ActivationStore, HostBudget, StoredCalls, split_call
from lowbit.scale.memory import SKELETON_BYTES_PER_BLOCK, block_memory
from lowbit.scale.output import PartWriter
from lowbit.scale.shards import SafetensorsShards, materialise, meta_model, release
from lowbit.structure.blocks import require_block_stacks
from lowbit.structure.inputs import LayerInputs, StopForward, replayable_call

logger = logging.getLogger(__name__)
WRITER = "lowbit.quantize_layerwise"
SOURCE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")
# Host memory a block takes at its peak on an accelerator, in blocks' weights: the block as read, on its way to
# the device, and the packed result on its way to the file. On the CPU the block runs on the host: its peak is
# the algorithm's (lowbit.scale.memory).
ACCELERATOR_RESIDENT_BLOCKS = 2


@dataclass
class LayerwiseResult:
    """What :func:`quantize_layerwise` did: the output directory, each block's output MSE (a layer-wise
    algorithm's report; empty for max calibration), the most activation bytes on disk at once (0: all in host
    memory) and the wall time."""

    path: Path
    layers: list[LayerReport] = field(default_factory=list)
    activation_bytes_on_disk: int = 0
    seconds: float = 0.0
    reserved_bytes: int | None = None  # of the budget: the modules outside the blocks and a block at its peak


def quantize_layerwise(
    model: str | Path,
    config: dict | QuantizeConfig,
    calib_data: list[dict[str, Tensor]],
    output_dir: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    host_memory_budget: int | None = None,
    offload_dir: str | Path | None = None,
    overwrite: bool = False,
) -> LayerwiseResult:
    """Quantize the Hugging Face causal LM in directory ``model`` (safetensors) with ``config`` one decoder block
    at a time (module docstring) and write it packed to ``output_dir`` (``lowbit.load_compressed`` /
    ``lowbit.hf.load_causal_lm`` load it).

    ``calib_data``: the batches (dicts of model inputs, e.g. ``lowbit.data.calibration_batches``); ``device``:
    where each block runs; ``dtype``: of the weights while calibrating (default: the checkpoint's
    ``config.json`` dtype); ``host_memory_budget``: bytes of host memory for the run's tensors (None: no limit):
    the modules outside the blocks and a block at its peak (``lowbit.scale.memory``: per algorithm, measured) are
    reserved (ValueError if the budget is smaller; with a budget glibc's mmap threshold is fixed, process-wide,
    so that freed temporaries leave the resident set: ``lowbit.ptq.memory.return_large_frees``), the rest holds
    activations, which go to files under ``offload_dir``
    (default: the system's temporary directory) beyond it. Algorithms: ``max`` and the layer-wise ones
    (``awq_lite``, ``awq_clip``, ``awq_full``, ``gptq``, ``scale_estimation``); ``smoothquant`` needs the whole
    model.
    """
    start = time.perf_counter()
    config = parse_config(config)
    step, layer_inputs = _algorithm_pass(config)
    source = _check_source(model)
    _check_data(calib_data)
    device = _check_device(device)
    _check_budget(host_memory_budget)
    check_writable(output_dir, overwrite)
    shards = SafetensorsShards(source)
    network = meta_model(source, dtype or _stored_dtype(source))
    quantize(network, dataclasses.replace(config, algorithm=None, algorithm_options={}))
    stacks = require_block_stacks(network, "quantize_layerwise")
    if len(stacks) != 1:
        raise ValueError(f"quantize_layerwise takes models with one stack of decoder blocks; "
                         f"{type(network).__name__} has {[name for name, _ in stacks]}")
    stack_name, layers = stacks[0]
    _check_outside(network, layers)
    reserved = _reserved(network, layers, config, full_pass_first(step, network, stacks), calib_data, device,
                         host_memory_budget)
    if host_memory_budget is not None:
        return_large_frees()
    budget = HostBudget(None if reserved is None else host_memory_budget - reserved, offload_dir)
    result = LayerwiseResult(Path(output_dir), reserved_bytes=reserved)
    writes = distributed.is_first_rank()  # distributed: every rank calibrates, the first writes
    try:
        with atomic_directory(output_dir, WRITER, overwrite) if writes else nullcontext() as staging:
            writer = PartWriter(staging) if writes else None
            outside = _outside_modules(network, layers)
            materialise(network, network, "", shards, device, skip=layers)
            for _, module in outside:
                calibrate_weights(module)
            first = _capture(network, layers[0], calib_data, ActivationStore(budget, device))
            for _, module in outside:  # packed and written on the host at the end: the device keeps one block
                module.to("cpu")
            sweep = _Sweep(network, stack_name, layers, first, shards, device, budget)
            full_pass = full_pass_first(step, network, stacks)
            if full_pass:  # the whole model's max calibration first, as lowbit.quantize does
                sweep.run(None, layer_inputs, full_pass, writer=None)
            result.layers = sweep.run(step, layer_inputs, full_pass, writer)
            first.hidden.close()
            if writer is not None:
                _write_outside(network, stack_name, writer)
                writer.finish()
                for file in SOURCE_FILES:
                    if (source / file).is_file():
                        shutil.copy(source / file, staging / file)
    finally:
        result.activation_bytes_on_disk = budget.peak_on_disk
        budget.close()
    result.seconds = time.perf_counter() - start
    return result


class _Sweep:
    """One pass over the blocks: each block materialised, calibrated, packed and written (or, without a
    writer, only calibrated), released; its outputs the next block's inputs."""

    def __init__(self, network: nn.Module, stack_name: str, layers: nn.ModuleList, first: StoredCalls,
                 shards: SafetensorsShards, device: torch.device, budget: HostBudget) -> None:
        self.network, self.stack_name, self.layers, self.first = network, stack_name, layers, first
        self.shards, self.device, self.budget = shards, device, budget
        self.needs_data = bool(static_activation_quantizers(layers))  # max calibration of weights alone: no pass

    def new_store(self) -> ActivationStore:
        return ActivationStore(self.budget, self.device)

    def run(self, step: LayerPass | None, layer_inputs: str, full_pass: bool,
            writer: PartWriter | None) -> list[LayerReport]:
        report, calls = [], self.first
        description = "max" if step is None else step.description
        for index, layer in enumerate(progress(self.layers, desc=f"{description} (layer-wise)", unit="block")):
            prefix = f"{self.stack_name}.{index}"
            materialise(self.network, layer, prefix, self.shards, self.device)
            calibrate_weights(layer)
            inputs = LayerInputs(calls)
            if step is None and not self.needs_data:
                outputs = None
            elif step is None:
                outputs = max_calibrate_block(layer, inputs, self.new_store)
            else:
                entry, outputs = calibrate_block(layer, inputs, step, layer_inputs, full_pass,
                                                 LayerReport(index, prefix, None, 0.0), self.new_store)
                report.append(entry)
            if outputs is not None:
                if calls is not self.first:
                    calls.hidden.close()
                calls = calls.following(outputs)
            if writer is not None:
                _pack(layer)
                writer.write(layer, prefix)
                self.layers[index] = nn.Module()  # written: dropped whole (packed layers keep kernel operands)
            else:
                release(layer)
            return_freed_host_memory()  # glibc keeps the block's freed temporaries otherwise (measured +186 MB)
        if calls is not self.first:
            calls.hidden.close()
        return report


def max_calibrate_block(layer: nn.Module, inputs: LayerInputs,
                        new_store: Callable[[], ActivationStore]) -> ActivationStore:
    """``lowbit.convert.max_calibrate`` for one block (weights calibrated already): one pass with the static
    activation quantizers collecting, the weights fake-quantized once; returns the outputs."""
    outputs = new_store()
    with weights_reused(layer), collecting_statistics(static_activation_quantizers(layer)):
        for output in inputs.forward(layer):
            outputs.append(output)
    return outputs


def _pack(module: nn.Module) -> None:
    """``compress`` when ``module`` holds a weight it can pack (else it stays fake-quantized: W4A8's chained
    weight quantizers)."""
    if compressible_linears(module) or any(compressible_experts(m) for m in module.modules()):
        compress(module)


def _capture(network: nn.Module, first_layer: nn.Module, calib_data: list[dict[str, Tensor]],
             store: ActivationStore) -> StoredCalls:
    """Run each batch up to ``first_layer`` and record its call: hidden states into ``store``."""
    others = []

    def record(_module, args, kwargs):
        hidden, rest = split_call(*replayable_call(args, kwargs))
        store.append(hidden)
        others.append(rest)
        raise StopForward

    handle = first_layer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in progress(calib_data, desc="first block inputs", unit="batch", leave=False):
                try:
                    network(**{name: value.to(store.device) for name, value in batch.items()})
                except StopForward:
                    pass
    finally:
        handle.remove()
    if not others:
        raise ValueError("calib_data ran no batch up to the first decoder block")
    return StoredCalls(store, others)


def _outside_modules(network: nn.Module, layers: nn.ModuleList) -> list[tuple[str, nn.Module]]:
    """The largest modules holding no block: (name, module) covering every tensor outside the stack."""
    inside = {id(m) for m in layers.modules()}
    found = []
    for name, module in network.named_modules():
        if id(module) in inside or any(name.startswith(f"{outer}.") for outer, _ in found):
            continue
        if not any(id(m) in inside for m in module.modules()):
            found.append((name, module))
    return found


def _write_outside(network: nn.Module, stack_name: str, writer: PartWriter) -> None:
    """Pack and write what is outside the blocks: the model with its (written) block stack set aside."""
    stack = network.get_submodule(stack_name)
    network.set_submodule(stack_name, nn.ModuleList())
    try:
        _pack(network)
        writer.write(network, "")
    finally:
        network.set_submodule(stack_name, stack)


def _algorithm_pass(config: QuantizeConfig) -> tuple[LayerPass | None, str]:
    """The config's layer-wise pass (None for max calibration) and its layer_inputs; ValueError otherwise."""
    options = dict(config.algorithm_options)
    if options.pop("calibrate_all_experts", False):
        raise ValueError("quantize_layerwise: calibrate_all_experts=True is not supported block by block")
    if config.algorithm is None:
        raise ValueError("config['algorithm'] is None: quantize_layerwise calibrates; use 'max' or a layer-wise "
                         "algorithm")
    if config.algorithm == "max":
        return None, "float"
    if config.algorithm == "smoothquant":
        raise ValueError("algorithm 'smoothquant' runs on the whole model (one pass over every block); "
                         "quantize_layerwise takes 'max' and the layer-wise algorithms")
    step, layer_inputs = layer_pass(config.algorithm, options)
    if layer_inputs == QUANTIZED_FLOAT_TARGETS:
        raise ValueError(f"quantize_layerwise: layer_inputs={layer_inputs!r} is not supported block by block (it "
                         "keeps the float model's activations beside the quantized ones); use 'float' or 'quantized'")
    return step, layer_inputs


def _check_source(model) -> Path:
    if not isinstance(model, (str, Path)):
        raise TypeError(f"model: expected the path of a Hugging Face model directory, got {type(model).__name__}")
    source = Path(model)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"model={str(model)!r} is not a Hugging Face model directory (no config.json)")
    return source


def _check_data(calib_data) -> None:
    if not isinstance(calib_data, list) or not calib_data or not all(isinstance(b, dict) for b in calib_data):
        raise ValueError("calib_data: expected a non-empty list of dicts of model inputs "
                         "(lowbit.data.calibration_batches)")


def _check_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r}: not a torch device ('cpu', 'cuda', 'cuda:1' ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}, but CUDA is not available")
    return device


def _check_budget(budget) -> None:
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0):
        raise ValueError(f"host_memory_budget={budget!r}: expected a positive number of bytes or None")


def _stored_dtype(source: Path) -> torch.dtype:
    from transformers import AutoConfig

    stored = getattr(AutoConfig.from_pretrained(source, local_files_only=True), "dtype", None)
    return stored if isinstance(stored, torch.dtype) else torch.float32


def _bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def full_pass_first(step: LayerPass | None, network: nn.Module, stacks: list) -> bool:
    """A layer-wise algorithm needs the whole model's max calibration first (a first sweep) when some static
    activation quantizer is not an analytic input range (module docstring, step 3)."""
    return step is not None and not ranges_measured_per_layer(network, stacks)


def _reserved(network: nn.Module, layers: nn.ModuleList, config: QuantizeConfig, full_pass: bool,
              calib_data: list[dict[str, Tensor]], device: torch.device, budget: int | None) -> int | None:
    """Host bytes the budget keeps from the activations: the modules outside the blocks, the model's skeleton
    (``SKELETON_BYTES_PER_BLOCK`` a block) and the largest block at its peak (on the CPU: ``lowbit.scale.memory``,
    the heavier of the max sweep and the algorithm when both run); None without a budget; ValueError when the
    budget is smaller."""
    if budget is None:
        return None
    layer = max(layers, key=_bytes)
    if device.type != "cpu":
        block = ACCELERATOR_RESIDENT_BLOCKS * _bytes(layer)
        what = f"{ACCELERATOR_RESIDENT_BLOCKS} blocks' weights"
    else:
        algorithms = [config.algorithm] + (["max"] if full_pass and config.algorithm != "max" else [])
        tokens = [next(iter(b.values())).numel() for b in calib_data]
        peaks = [block_memory(layer, name, config.algorithm_options, sum(tokens), max(tokens)) for name in algorithms]
        block = max(peak.total for peak in peaks)
        what = f"the largest block at its peak under {' and '.join(algorithms)} ({block} bytes)"
    reserved = _bytes(network) - _bytes(layers) + block + SKELETON_BYTES_PER_BLOCK * len(layers)
    if reserved > budget:
        raise ValueError(f"host_memory_budget={budget} bytes is below the {reserved} bytes the run holds besides "
                         f"activations (the modules outside the blocks and {what})")
    return reserved


def _check_outside(network: nn.Module, layers: nn.ModuleList) -> None:
    """ValueError for a static activation quantizer outside the blocks: its calibration would need a pass
    through the whole model."""
    inside = {id(m) for m in layers.modules()}
    outside = [f"{name}.{slot}" for name, module in network.named_modules()
               if is_quantized(module) and id(module) not in inside
               for slot in module.quantizer_names if not slot.endswith("weight_quantizer")
               if any(q.is_enabled and not q.config.is_dynamic for q in tensor_quantizers(getattr(module, slot)))]
    if outside:
        raise ValueError(f"quantize_layerwise calibrates activations inside the decoder blocks only; static "
                         f"activation quantizer(s) outside them: {outside[:5]} (disable them, e.g. "
                         "'*lm_head*': {'enable': False}, or use lowbit.quantize)")
