"""compress_weights' options, validated once, and the plan they give: one format per layer.

The plan is computed without touching the model (statistics come from hooks that are removed
afterwards), so every error is raised before anything is mutated.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from torch import nn

from lowbit.weight_compression.data import forward_loop
from lowbit.weight_compression.experts import ExpertsWeight, find_fused_experts, warn_float_experts
from lowbit.weight_compression.layers import (
    EMBEDDING,
    IgnoredScope,
    WeightLayer,
    find_weight_layers,
    ratio_defining_layers,
)
from lowbit.weight_compression.modes import (
    INT8_MODES,
    MX_BLOCK_SIZE,
    BackupMode,
    CompressWeightsMode,
    LayerFormat,
    backup_format,
    default_group_size,
)
from lowbit.weight_compression.sensitivity import (
    SensitivityMetric,
    collect_input_statistics,
    select_primary,
    sensitivity_scores,
)
from lowbit.weight_compression.summary import FLOAT, CompressionSummary, LayerSummary, layer_bytes, tensor_bytes

# modes whose scale_estimation flag runs lowbit's ``scale_estimation`` (integer grids); NF4 / FP4 get AWQ's
# clip search for it (``apply``)
SCALE_ESTIMATION_MODES = (CompressWeightsMode.INT4_SYM, CompressWeightsMode.INT4_ASYM)


@dataclass(frozen=True)
class CompressionOptions:
    """compress_weights' arguments after validation (see ``check_options``)."""

    mode: CompressWeightsMode
    group_size: int
    ratio: float
    sensitivity_metric: SensitivityMetric
    all_layers: bool
    awq: bool
    scale_estimation: bool
    gptq: bool
    backup_mode: BackupMode

    @property
    def primary_format(self) -> LayerFormat:
        return LayerFormat(self.mode, self.group_size)

    @property
    def is_int8(self) -> bool:
        return self.mode in INT8_MODES


def _as_enum(enum: type[Enum], value: Any, name: str) -> Enum:
    if isinstance(value, Enum) and not isinstance(value, enum):
        value = value.value  # e.g. CompressWeightsMode.INT8_SYM as a backup mode
    try:
        return enum(value)
    except ValueError:
        allowed = sorted({member.value for member in enum})
        raise ValueError(f"{name}={value!r}: allowed are {allowed}") from None


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r}: expected True or False")
    return value


def check_options(
    mode: Any = CompressWeightsMode.INT8_ASYM,
    group_size: int | None = None,
    ratio: float | None = None,
    has_dataset: bool = False,
    sensitivity_metric: Any = None,
    all_layers: bool = False,
    awq: bool = False,
    scale_estimation: bool = False,
    gptq: bool = False,
    backup_mode: Any = BackupMode.INT8_ASYM,
) -> CompressionOptions:
    """Validate compress_weights' arguments into CompressionOptions; errors name the argument.

    Defaults (NNCF's): ``group_size`` -1 for 8-bit modes, 32 for MXFP4, else 128; ``ratio`` 1;
    ``sensitivity_metric`` WEIGHT_QUANTIZATION_ERROR without a dataset, MAX_ACTIVATION_VARIANCE with one;
    ``backup_mode`` None means INT8_ASYM. INT8 modes compress every layer per channel, so ``ratio``,
    ``group_size``, ``sensitivity_metric``, ``all_layers`` and the data-aware refinements do not apply.
    """
    mode = _as_enum(CompressWeightsMode, mode, "mode")
    backup_mode = _as_enum(BackupMode, BackupMode.INT8_ASYM if backup_mode is None else backup_mode, "backup_mode")
    flags = {name: _check_bool(value, name) for name, value in
             (("all_layers", all_layers), ("awq", awq), ("scale_estimation", scale_estimation), ("gptq", gptq))}
    if mode in INT8_MODES:
        overridden = {"ratio": ratio not in (None, 1), "group_size": group_size not in (None, -1),
                      "sensitivity_metric": sensitivity_metric is not None, **flags}
        given = [name for name, value in overridden.items() if value]
        if given:
            raise ValueError(
                f"mode={mode.value} compresses every layer in 8 bits per channel; {given} do not apply (leave them "
                "at their defaults or choose a 4-bit mode)"
            )
    group_size = _check_group_size(mode, group_size)
    ratio = _check_ratio(ratio)
    if sensitivity_metric is None:
        metric = SensitivityMetric.WEIGHT_QUANTIZATION_ERROR
        if has_dataset:
            metric = SensitivityMetric.MAX_ACTIVATION_VARIANCE
    else:
        metric = _as_enum(SensitivityMetric, sensitivity_metric, "sensitivity_metric")
    needs_data = [name for name, value in flags.items() if value and name != "all_layers"]
    if metric.is_data_aware and sensitivity_metric is not None:
        needs_data.insert(0, f"sensitivity_metric={metric.value}")
    _check_refinements(mode, flags)
    if needs_data and not has_dataset:
        raise ValueError(
            f"{needs_data} need calibration data: pass dataset=<an iterable of model inputs>, e.g. "
            "lowbit.data.calibration_batches(tokenizer, text); the data-free metric is "
            "SensitivityMetric.WEIGHT_QUANTIZATION_ERROR"
        )
    return CompressionOptions(mode, group_size, ratio, metric, flags["all_layers"], flags["awq"],
                              flags["scale_estimation"], flags["gptq"], backup_mode)


def _check_refinements(mode: CompressWeightsMode, flags: dict[str, bool]) -> None:
    """MXFP4's scales come from each block at run time: nothing for scale estimation or GPTQ to fix."""
    refused = [name for name in ("scale_estimation", "gptq") if flags[name] and mode == CompressWeightsMode.MXFP4]
    if refused:
        raise ValueError(
            f"{refused} with mode={mode.value}: MX block scales are dynamic (computed from each block), so there "
            "is no static scale to estimate or keep; use int4_sym, int4_asym, nf4 or fp4, or drop them"
        )


def _check_group_size(mode: CompressWeightsMode, group_size: Any) -> int:
    if group_size is None:
        return default_group_size(mode)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size < 1 and group_size != -1):
        raise ValueError(f"group_size={group_size!r}: expected a positive int (128, 64, 32, ...) or -1 (per channel)")
    if mode == CompressWeightsMode.MXFP4 and group_size != MX_BLOCK_SIZE:
        raise ValueError(f"group_size={group_size}: mode=mxfp4 has blocks of {MX_BLOCK_SIZE} (OCP MX)")
    return group_size


def _check_ratio(ratio: Any) -> float:
    if ratio is None:
        return 1.0
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 <= ratio <= 1:
        raise ValueError(f"ratio={ratio!r}: expected a number in [0, 1] (the primary share of the weights)")
    return float(ratio)


@dataclass(frozen=True)
class LayerPlan:
    """A layer and its format (None: the weight stays float); ``primary`` when in the primary mode."""

    layer: WeightLayer
    format: LayerFormat | None
    ratio_defining: bool
    primary: bool


@dataclass(frozen=True)
class CompressionPlan:
    """The format of every compressible layer of one model under ``options``."""

    layers: tuple[LayerPlan, ...]
    options: CompressionOptions
    model_bytes: int
    experts: tuple[ExpertsWeight, ...] = ()  # fused 3-D expert weights: the primary format (``experts``)

    @property
    def primary_names(self) -> list[str]:
        return [entry.layer.name for entry in self.layers if entry.primary]

    def with_primary(self, names: Iterable[str]) -> CompressionPlan:
        """The same plan with exactly ``names`` (ratio-defining layers) in the primary mode.

        For baselines such as a random choice of layers at the same ratio.
        """
        names = set(names)
        defining = {entry.layer.name for entry in self.layers if entry.ratio_defining}
        if not names <= defining:
            raise ValueError(f"names {sorted(names - defining)} are not ratio-defining layers of this plan")
        layers = [entry.layer for entry in self.layers]
        return _build_plan(layers, defining, names, self.options, self.model_bytes, self.experts)

    def summary(self) -> CompressionSummary:
        rows = []
        for entry in self.layers:
            layer = entry.layer
            out_features, in_features = layer.shape
            original = layer.num_weights * layer.module.weight.element_size()
            compressed = original if entry.format is None else layer_bytes(
                entry.format.storage_bits(out_features, in_features))
            rows.append(LayerSummary(
                layer.name, layer.kind, layer.shape, layer.num_weights,
                FLOAT if entry.format is None else entry.format.label, entry.ratio_defining, original, compressed,
                layer.tied_to,
            ))
        fmt = self.options.primary_format
        for weights in self.experts:
            experts, out_features, in_features = weights.shape
            original = weights.parameter.numel() * weights.parameter.element_size()
            compressed = experts * layer_bytes(fmt.storage_bits(out_features, in_features))
            rows.append(LayerSummary(weights.name, "experts", (experts * out_features, in_features),
                                     weights.parameter.numel(), fmt.label, False, original, compressed))
        return CompressionSummary(tuple(rows), self.model_bytes)


def _build_plan(layers: list[WeightLayer], defining: set[str], primary_names: set[str], options: CompressionOptions,
                model_bytes: int, experts: tuple[ExpertsWeight, ...] = ()) -> CompressionPlan:
    formats: dict[str, LayerFormat | None] = {}
    entries = []
    for layer in layers:
        if layer.tied_to is not None:
            fmt = formats[layer.tied_to]
        elif layer.name in primary_names:
            fmt = options.primary_format
        else:
            fmt = backup_format(options.backup_mode)
        formats[layer.name] = fmt
        entries.append(LayerPlan(layer, fmt, layer.name in defining, layer.name in primary_names))
    return CompressionPlan(tuple(entries), options, model_bytes, experts)


def _check_group_divides(layers: list[WeightLayer | ExpertsWeight], group_size: int) -> None:
    if group_size == -1:
        return
    failing = [f"{layer.name} (in={layer.shape[-1]})" for layer in layers if layer.shape[-1] % group_size]
    if failing:
        raise ValueError(
            f"group_size={group_size} does not divide the input size of {failing}; choose a group size that "
            "divides them, -1 (per channel), or leave these layers out with ignored_scope"
        )


def plan_compression(
    model: nn.Module,
    options: CompressionOptions,
    dataset: list | None = None,
    ignored_scope: IgnoredScope = None,
) -> CompressionPlan:
    """Choose every layer's format: ratio-defining layers ranked by ``options.sensitivity_metric`` take the
    primary mode up to ``options.ratio``, the rest the backup mode. Data-aware metrics run ``dataset``
    (a list of model inputs) through the float model once, with hooks."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    fused = find_fused_experts(model)
    layers, last_matmul_skipped, ignored = find_weight_layers(model, ignored_scope, [w.name for w in fused])
    experts = tuple(weights for weights in fused if weights.name not in ignored)
    if options.mode == CompressWeightsMode.NF4:
        warn_float_experts(list(experts), "mode=nf4 has no per-expert quantizer")
        experts = ()
    _check_group_divides(list(experts), options.group_size)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no layer compress_weights can compress (nn.Linear, transformers Conv1D, "
            "nn.Embedding, nn.Conv1d/2d/3d), or ignored_scope leaves none"
        )
    owned = [layer for layer in layers if layer.tied_to is None]
    defining = owned if options.is_int8 else ratio_defining_layers(layers, last_matmul_skipped, options.all_layers)
    _check_group_divides(defining, options.group_size)
    primary = defining
    if options.ratio < 1 and defining:
        metric = options.sensitivity_metric
        statistics = None
        if metric.is_data_aware:
            statistics = collect_input_statistics(
                model, [layer for layer in defining if layer.kind != EMBEDDING], metric, forward_loop(dataset))
        scores = sensitivity_scores(defining, metric, statistics)
        chosen = select_primary([layer.num_weights for layer in defining], scores, options.ratio)
        primary = [defining[i] for i in chosen]
    return _build_plan(layers, {layer.name for layer in defining}, {layer.name for layer in primary}, options,
                       tensor_bytes(model), experts)
