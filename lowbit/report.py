"""Measure a quantized model against its original: KL divergence to it, perplexity delta, packed weight size,
wall time.

Used by ``lowbit demo`` and ``bench/accuracy.py``; accuracy is ranked by the mean KL divergence to the float
model (``lowbit.eval.divergence``), the perplexity delta beside it. The size here is an *estimate from the quantizer
attributes* (fake quantization keeps float weights in memory): what the weights would take packed.

    packed bits of one weight tensor = numel * element_bits + n_scales * scale_bits (+ zero points)

- ``element_bits``: n for intN, 8 for FP8 E4M3/E5M2, 4 for FP4 E2M1 (NVFP4, MXFP4);
- one scale per ``amax`` entry (per tensor: 1, per channel: out_features, per block: numel / block);
  a block scale in its own format (``scale_bits``: E4M3 for NVFP4, E8M0 for MX) takes 8 bits, NVFP4
  adds one FP32 global scale; other per-channel / per-block scales are stored in the quantizer's
  ``trt_high_precision_dtype`` (16 bits for Half / BFloat16); a lone per-tensor scale is FP32;
- asymmetric integers add one zero point of ``element_bits`` per scale;
- a SequentialQuantizer (W4A8) stores the narrowest stage's elements and every stage's scales;
- every other parameter (embeddings, norms, the output head, unquantized layers) counts at
  ``high_precision_bytes`` per element (2: the bf16 checkpoint), whatever its dtype in memory.
"""

from __future__ import annotations

import copy
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from lowbit import assets
from lowbit.attributes import QuantizerAttributeConfig
from lowbit.data import calibration_batches, default_calibration_text, default_eval_text, make_forward_loop
from lowbit.eval import Divergence, divergence
from lowbit.eval import perplexity as text_perplexity
from lowbit.modules import is_quantized
from lowbit.quantizer import BlockView, SequentialQuantizer
from lowbit.structure.weights import weights_by_slot

SEQ_LEN = 256
EVAL_STRIDE = 128
CALIBRATION_BATCH_SIZE = 8
PER_TENSOR_SCALE_BITS = 32
HIGH_PRECISION_BITS = {"Half": 16, "BFloat16": 16, "Float": 32}


def element_bits(config: QuantizerAttributeConfig) -> int:
    """Bits one packed element takes: ``num_bits`` for integers, 1 + exponent + mantissa for floats."""
    if config.is_float:
        exponent, mantissa = config.num_bits
        return 1 + exponent + mantissa
    return config.num_bits


def scale_count(config: QuantizerAttributeConfig, weight_shape: Sequence[int]) -> int:
    """Number of scales (``amax`` entries) for a weight of ``weight_shape``, from the quantizer's own view."""
    view = BlockView(config, torch.Size(weight_shape))
    view_shape = view.to_view(torch.empty(tuple(weight_shape), device="meta")).shape
    return math.prod(1 if dim in view.reduce_dims else size for dim, size in enumerate(view_shape))


def scale_bits(config: QuantizerAttributeConfig, n_scales: int) -> int:
    """Bits of one scale: 8 for E4M3 / E8M0 block scales, 32 for a lone per-tensor scale, else the
    high-precision dtype (16 for Half / BFloat16)."""
    if config.block_scale_bits is not None:
        return 8
    if n_scales == 1:
        return PER_TENSOR_SCALE_BITS
    return HIGH_PRECISION_BITS[config.trt_high_precision_dtype]


def packed_weight_bits(configs: Sequence[QuantizerAttributeConfig], weight_shape: Sequence[int]) -> int:
    """Packed bits of one weight quantized by ``configs`` (one config, or the stages of a sequence)."""
    numel = math.prod(weight_shape)
    bits = numel * min(element_bits(config) for config in configs)
    for config in configs:
        n_scales = scale_count(config, weight_shape)
        bits += n_scales * scale_bits(config, n_scales)
        if config.block_scale_bits == (4, 3):
            bits += PER_TENSOR_SCALE_BITS  # NVFP4's global scale
        if config.asymmetric:
            bits += n_scales * element_bits(config)
    return bits


def _enabled_weight_configs(quantizer: nn.Module | None) -> list[QuantizerAttributeConfig]:
    if quantizer is None or not quantizer.is_enabled:
        return []
    stages = list(quantizer) if isinstance(quantizer, SequentialQuantizer) else [quantizer]
    return [stage.config for stage in stages if stage.is_enabled]


def packed_weight_bytes(model: nn.Module, high_precision_bytes: int = 2) -> int:
    """Bytes of every parameter of ``model`` once packed (see the module docstring for the rules).

    Quantized weights count ``packed_weight_bits`` (rounded up to whole bytes per tensor); every other
    floating parameter ``high_precision_bytes`` per element; integer parameters their own size.
    Buffers (rotary tables, quantizer ``amax``) are not weights and are not counted.
    """
    if high_precision_bytes not in (1, 2, 4, 8):
        raise ValueError(f"high_precision_bytes={high_precision_bytes!r}: allowed are 1, 2, 4, 8")
    total, counted = 0, set()
    for module in model.modules():
        stacked = getattr(type(module), "stacked_weights", False)  # fused experts: each (out, in) packed alone
        for slot, weight in (weights_by_slot(module) if is_quantized(module) else {}).items():
            configs = _enabled_weight_configs(getattr(module, slot, None))
            parameter = weight if weight._base is None else weight._base  # Conv1D's slot is a transpose view
            if configs and id(parameter) not in counted:
                bits = (weight.shape[0] * packed_weight_bits(configs, weight.shape[1:]) if stacked
                        else packed_weight_bits(configs, weight.shape))
                total += math.ceil(bits / 8)
                counted.add(id(parameter))
    for parameter in model.parameters():
        if id(parameter) in counted:
            continue
        counted.add(id(parameter))
        size = high_precision_bytes if parameter.is_floating_point() else parameter.element_size()
        total += parameter.numel() * size
    return total


@dataclass(frozen=True)
class Measurement:
    """One quantized model measured: its perplexity, KL divergence to the original, packed weight bytes and
    quantization time.

    ``kl`` and ``kl_p99`` are the mean and 99th percentile of the per-token KL(original || quantized) in nats,
    ``top1`` the share of positions where both models' most likely next token agree (``lowbit.eval.Divergence``;
    None when only perplexity was measured). ``seconds`` is wall time, ``cpu_seconds`` the process's CPU time
    over the same span (all threads; steadier than wall time on a shared machine). ``error`` holds why a
    configuration could not run (then the numbers are None).
    """

    library: str
    config: str
    perplexity: float | None = None
    weight_bytes: int | None = None
    kl: float | None = None
    kl_p99: float | None = None
    top1: float | None = None
    seconds: float | None = None
    cpu_seconds: float | None = None
    error: str | None = None

    def as_row(self, baseline: Measurement) -> dict:
        """A JSON-ready dict with the perplexity delta vs ``baseline``: absolute and in percent."""
        row = asdict(self)
        if self.perplexity is not None and baseline.perplexity is not None:
            row["delta"] = self.perplexity - baseline.perplexity
            row["delta_pct"] = 100.0 * row["delta"] / baseline.perplexity
        else:
            row["delta"] = row["delta_pct"] = None
        return row


def time_quantize(model: nn.Module, quantize: Callable[[nn.Module], nn.Module]) -> tuple[nn.Module, float, float]:
    """``(quantize(deep copy of model), wall seconds, CPU seconds)``; the copy is made before the clocks start.

    CPU time is the process's (all threads): about ``threads x wall`` on an idle machine, less when
    other processes take the cores.
    """
    candidate = copy.deepcopy(model)
    start, cpu_start = time.perf_counter(), time.process_time()
    quantized = quantize(candidate)
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # queued GPU work is part of the time
    return quantized, time.perf_counter() - start, time.process_time() - cpu_start


def measure(library: str, config: str, model: nn.Module, quantize: Callable[[nn.Module], nn.Module],
            evaluate: Callable[[nn.Module], Divergence | float],
            size: Callable[[nn.Module], int | None]) -> Measurement:
    """Quantize a copy of ``model`` (``time_quantize``), then measure the result with ``size`` and then
    ``evaluate`` (which may fold weights): a ``Divergence`` against the original, or a perplexity alone.

    An exception from ``quantize`` or the measurements becomes ``Measurement(error=...)`` so that one
    failing configuration does not stop a comparison; KeyboardInterrupt still stops it.
    """
    try:
        quantized, seconds, cpu_seconds = time_quantize(model, quantize)
        weight_bytes = size(quantized)
        scores = evaluate(quantized)
        if isinstance(scores, Divergence):
            return Measurement(library, config, scores.perplexity, weight_bytes, scores.mean_kl, scores.kl_p99,
                               scores.top1, seconds, cpu_seconds)
        return Measurement(library, config, scores, weight_bytes, seconds=seconds, cpu_seconds=cpu_seconds)
    except Exception as error:  # recorded in the table, by design
        first_line = (str(error).strip().splitlines() or [""])[0]
        return Measurement(library, config, error=f"{type(error).__name__}: {first_line}"[:200])


@dataclass
class Workload:
    """The model under test and what it is calibrated and measured on (shared with bench/accuracy.py)."""

    model: nn.Module
    tokenizer: object
    calibration: list[dict[str, torch.Tensor]]
    eval_text: str
    eval_tokens: int
    progress: bool = True

    @classmethod
    def default(cls, calib_samples: int, eval_tokens: int, progress: bool = True, model: str = "default") -> Workload:
        """The bundled model (or the fixture ``model`` names, ``model_loader``; float32, CPU) with the bundled
        calibration and held-out texts."""
        model, tokenizer = model_loader(model)()
        calibration = calibration_batches(tokenizer, default_calibration_text(), calib_samples, SEQ_LEN,
                                          CALIBRATION_BATCH_SIZE)
        return cls(model, tokenizer, calibration, default_eval_text(), eval_tokens, progress)

    def forward_loop(self):
        return make_forward_loop(self.calibration, progress=self.progress)

    def perplexity(self, model: nn.Module) -> float:
        """Perplexity of the first ``eval_tokens`` held-out tokens: windows of ``SEQ_LEN`` tokens, each
        scoring its last ``EVAL_STRIDE`` (so every token has at least ``SEQ_LEN - EVAL_STRIDE`` of context)."""
        return text_perplexity(model, self.tokenizer, self.eval_text, seq_len=SEQ_LEN, stride=EVAL_STRIDE,
                               max_tokens=self.eval_tokens, progress=self.progress)

    def divergence(self, model: nn.Module) -> Divergence:
        """``model`` against the workload's own (float) model on the tokens ``perplexity`` scores, the two run
        window by window side by side (``lowbit.eval.divergence``)."""
        return divergence(model, self.model, self.tokenizer, self.eval_text, seq_len=SEQ_LEN, stride=EVAL_STRIDE,
                          max_tokens=self.eval_tokens, progress=self.progress)


def model_loader(name: str) -> Callable[[], tuple[nn.Module, object]]:
    """The loader of a bundled model by name: ``"default"`` -> ``lowbit.assets.load_default_model``, any other
    name -> ``lowbit.assets.load_<name>_model``; ValueError naming the models lowbit.assets provides."""
    loader = getattr(assets, f"load_{name}_model", None) if name.isidentifier() else None
    if not callable(loader):
        known = sorted(key[len("load_"):-len("_model")] for key in dir(assets)
                       if key.startswith("load_") and key.endswith("_model"))
        raise ValueError(f"model={name!r}: lowbit.assets has no load_{name}_model; allowed are {known}")
    return loader


def measure_baseline(workload: Workload) -> Measurement:
    """The unquantized model's measurement (no quantization time)."""
    return Measurement("none", "original", workload.perplexity(workload.model), packed_weight_bytes(workload.model))


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo where there is one, else the platform's word for it."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.system()


def _load_average() -> str:
    """The 1, 5 and 15 minute load averages (other processes competing for the CPUs), where known."""
    if not hasattr(os, "getloadavg"):
        return "unknown"
    return " / ".join(f"{load:.2f}" for load in os.getloadavg()) + " (1 / 5 / 15 min)"


def run_context(argv: Sequence[str]) -> dict:
    """Command, date, machine, load and versions, written next to measured numbers."""
    return {
        "command": " ".join(argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{cpu_name()} ({platform.machine()}), {available_cpus()} CPUs, "
                   f"torch threads {torch.get_num_threads()}"
                   + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
        "load_average": _load_average(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
