"""The calibration algorithms by name: ``run_algorithm(name, model, forward_loop, options)``.

"max" is plain max calibration (``lowbit.calibration.max_calibrate``); the others run layer by layer
(``lowbit.algorithms.layerwise``) and return one :class:`LayerReport` per decoder layer.

================  =======================================================================  ================
name              options (defaults)                                                       module
================  =======================================================================  ================
max               none                                                                     convert
smoothquant       alpha=1.0 (ModelOpt's default), report=False (True: one more pass for     smoothquant
                  the per-layer error report)
awq_lite          alpha_step=0.1, max_tokens=4096, scale_per_linear=False,                 awq
                  scale_estimation=False, loss_dtype="float32" ("bfloat16": the scale
                  search's loss products in bf16, ~4x faster with native bf16),
                  identity=True (False: plain rounding is no candidate, ModelOpt's grid)
awq_clip          min_clip_ratio=0.5, shrink_step=0.05, max_clip_tokens=512                awq
awq_full          awq_lite's and awq_clip's options                                        awq
gptq              block_size=128, percdamp=0.01, act_order=False, static_groups=False,     gptq
                  scale_estimation=False, hqq=False (True: HQQ's grid, fixed, data-free),  gptq_micro
                  block_scales="max" (NVFP4 / MX: "mse" / "4over6" search each block's
                  scale when the column loop reaches it, "loss" by GPTQ's loss),
                  input_error=False (True: round the least-squares weight for the
                  quantized inputs, W4A4; gptq_target)
scale_estimation  min_ratio=0.7, ratio_step=0.02, steps=1, objective="block"               scale_estimation
hqq               iterations=20, lp_norm=0.7, beta=10.0, kappa=1.01 (data-free)           hqq
autoround         iterations=200, lr=0.005, minmax_lr=0.005 (auto-round's defaults),       autoround
                  batches_per_step=0 (k > 0: a minibatch of k batches each step),
                  start="rtn" ("gptq": from GPTQ + scale estimation's codes and grid)
svdquant          rank=32, alpha=0.5 (smoothing strength)                                  svdquant
lora_correction   rank=8, percdamp=0.01                                                    lora_correction
lsq               iterations=200, lr=0.001, weight_lr=0.0 (> 0: the latent weights too),  lsq
                  batches_per_step=1, latent="codes" (the start's codes kept; "float": LSQ's),
                  temperature=1.0 (T > 1: distillation KL of the T-softened distributions),
                  start="autoround" (any other algorithm),
                  start_options={} (the start's options): learned steps, end to end
                  against the float model's next-token distribution (KL)
================  =======================================================================  ================

``block_scale_search`` (module of that name): ``search="mse"`` or ``"4over6"`` (NVFP4 only); NVFP4 / MX weight
quantizers, data-free.

Every layer-wise algorithm (all but max and smoothquant) also takes ``layer_inputs="float"`` (each
layer calibrated on the float model's activations, as ModelOpt and NNCF do) or ``"quantized"`` (on the
outputs of the already quantized layers before it) or ``"quantized_float_targets"`` (those inputs, the float
model's block outputs as the reference: AutoRound then fits each block to the float model); see
``lowbit.algorithms.layerwise``.

Chaining: ``scale_estimation`` = True (its defaults) or a dict of its options runs scale estimation on
each layer after AWQ's scale (and clip) search, or before GPTQ, which then keeps the estimated grid as
fixed (static) groups and only chooses the codes. Its defaults (dense starts, one refit) gave a lower
layer error than 8 starts x 5 refits at half the time on the bundled model. There (INT4 g128, 32 x 256
calibration tokens) ``gptq`` + ``scale_estimation`` was the best pair (d ppl 0.21 sym, 0.28 asym) and
``awq_lite`` + ``scale_estimation`` worse than scale estimation alone (AWQ's scales are chosen for plain
rounding; NNCF shows the same direction).

``scale_per_linear``: AWQ's scale per linear, as its input quantizer's pre_quant_scale (ModelOpt's
awq_lite), instead of one scale per input group that folds into the norm. ``awq_lite`` and ``gptq``
take asymmetric integer weight quantizers too; ``awq_clip``/``awq_full`` symmetric ones only.

Options are validated, and the weight quantizers checked, before the model is touched.

Adding an algorithm is one file with its function ``(model, forward_loop, **options) -> list[LayerReport] | None``
plus one line in ``ALGORITHMS`` and its defaults in ``DEFAULT_OPTIONS``; code outside lowbit calls
``register_algorithm(name, function, defaults)``. Options are checked against the defaults' names and types.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from lowbit.algorithms.autoround import AUTOROUND_OPTIONS, autoround_layer, check_autoround_options, tunable_weights
from lowbit.algorithms.awq import (
    LOSS_DTYPES,
    AwqInputStatistics,
    alpha_grid,
    awq_clip_layer,
    awq_scale_layer,
    clip_ratios,
)
from lowbit.algorithms.block_scale_search import (
    BLOCK_SCALE_SEARCH_OPTIONS,
    block_scale_search,
    check_block_scale_search_options,
    searchable_weights,
)
from lowbit.algorithms.gptq import RangeEstimator, gptq_group_size, gptq_layer, linears_with_hessians
from lowbit.algorithms.gptq_micro import BLOCK_SCALE_CHOICES, is_micro_scaled, micro_block_size
from lowbit.algorithms.hqq import HQQ_OPTIONS, check_hqq_options, hqq, hqq_linear_range, hqq_weights
from lowbit.algorithms.layerwise import (
    LayerInputs,
    LayerPass,
    LayerReport,
    check_layer_inputs,
    run_layerwise,
)
from lowbit.algorithms.lora_correction import (
    LORA_CORRECTION_OPTIONS,
    check_lora_correction_options,
    lora_correction_layer,
)
from lowbit.algorithms.lsq import LSQ_OPTIONS, check_lsq_options, lsq, record_teacher
from lowbit.algorithms.scale_estimation import (
    OBJECTIVES,
    check_steps,
    estimate_linear_range,
    estimation_group_size,
    start_ratios,
)
from lowbit.algorithms.smoothquant import DEFAULT_ALPHA, check_alpha, smoothquant
from lowbit.algorithms.svdquant import SVDQUANT_OPTIONS, check_svdquant_options, svdquant_layer, svdquant_weights
from lowbit.algorithms.weights import weight_group_size
from lowbit.attributes import check_type
from lowbit.calibration import ForwardLoop, max_calibrate
from lowbit.structure.blocks import require_block_stacks
from lowbit.structure.groups import row_weights
from lowbit.structure.weights import QuantizableWeight

AWQ_LITE_OPTIONS = {"alpha_step": 0.1, "max_tokens": 4096, "scale_per_linear": False, "scale_estimation": False,
                    "loss_dtype": "float32", "identity": True}
AWQ_CLIP_OPTIONS = {"min_clip_ratio": 0.5, "shrink_step": 0.05, "max_clip_tokens": 512}
SCALE_ESTIMATION_OPTIONS = {"min_ratio": 0.7, "ratio_step": 0.02, "steps": 1, "objective": "block"}
LAYERWISE_OPTIONS = {"layer_inputs": "float"}
DEFAULT_OPTIONS: dict[str, dict] = {
    "max": {},
    "smoothquant": {"alpha": DEFAULT_ALPHA, "report": False},
    "awq_lite": {**AWQ_LITE_OPTIONS, **LAYERWISE_OPTIONS},
    "awq_clip": {**AWQ_CLIP_OPTIONS, **LAYERWISE_OPTIONS},
    "awq_full": {**AWQ_LITE_OPTIONS, **AWQ_CLIP_OPTIONS, **LAYERWISE_OPTIONS},
    "gptq": {"block_size": 128, "percdamp": 0.01, "act_order": False, "static_groups": False,
             "scale_estimation": False, "hqq": False, "block_scales": "max", "input_error": False,
             **LAYERWISE_OPTIONS},
    "scale_estimation": {**SCALE_ESTIMATION_OPTIONS, **LAYERWISE_OPTIONS},
    "hqq": dict(HQQ_OPTIONS),
    "autoround": {**AUTOROUND_OPTIONS, **LAYERWISE_OPTIONS},
    "svdquant": {**SVDQUANT_OPTIONS, **LAYERWISE_OPTIONS},
    "lora_correction": {**LORA_CORRECTION_OPTIONS, **LAYERWISE_OPTIONS},
    "block_scale_search": dict(BLOCK_SCALE_SEARCH_OPTIONS),
    "lsq": dict(LSQ_OPTIONS),
}
DATA_FREE = ("max", "hqq", "block_scale_search")  # run without calibration data (weight-only configs)


def _range_estimator(scale_estimation: bool | dict) -> RangeEstimator | None:
    """``estimate_linear_range`` with scale estimation's options (the chained form), or None when off."""
    if scale_estimation is False:
        return None
    options = {**SCALE_ESTIMATION_OPTIONS, **({} if scale_estimation is True else scale_estimation)}
    ratios = start_ratios(options["min_ratio"], options["ratio_step"])
    return partial(estimate_linear_range, ratios=ratios, steps=options["steps"], objective=options["objective"])


def scale_estimation_layer(layer: nn.Module, inputs: LayerInputs, estimate_range: RangeEstimator) -> None:
    """Scale estimation of every linear with an enabled weight quantizer, against its input's Hessian."""
    for name, linear, hessian in linears_with_hessians(layer, inputs):
        estimate_range(linear, name, hessian)


def _chained(description: str, *passes: Callable[[nn.Module, LayerInputs], None],
             scale_estimation: bool | dict = False):
    """One layer pass running ``passes`` in order, then scale estimation when asked."""
    estimate_range = _range_estimator(scale_estimation)
    if estimate_range is not None:
        passes = (*passes, partial(scale_estimation_layer, estimate_range=estimate_range))
        description += "+scale_estimation"

    def layer_pass(layer: nn.Module, inputs: LayerInputs) -> None:
        for step in passes:
            step(layer, inputs)

    return layer_pass, description


def _awq_scale_pass(alpha_step, max_tokens, scale_per_linear, loss_dtype, identity):
    """AWQ's scale search as a layer pass, and the watch that collects its statistics in the runner's
    float reference pass."""
    statistics = AwqInputStatistics(max_tokens)
    layer_pass = partial(awq_scale_layer, alpha_step=alpha_step, max_tokens=max_tokens,
                         scale_per_linear=scale_per_linear, statistics=statistics, loss_dtype=loss_dtype,
                         identity=identity)
    return layer_pass, statistics.watching


def _awq_lite(alpha_step, max_tokens, scale_per_linear, scale_estimation, loss_dtype, identity) -> LayerPass:
    scale_pass, watch = _awq_scale_pass(alpha_step, max_tokens, scale_per_linear, loss_dtype, identity)
    layer_pass, description = _chained("awq_lite", scale_pass, scale_estimation=scale_estimation)
    return LayerPass(layer_pass, description, watch)


def _awq_clip(min_clip_ratio, shrink_step, max_clip_tokens) -> LayerPass:
    return LayerPass(partial(awq_clip_layer, min_clip_ratio=min_clip_ratio, shrink_step=shrink_step,
                             max_clip_tokens=max_clip_tokens), "awq_clip")


def _awq_full(alpha_step, max_tokens, scale_per_linear, scale_estimation, min_clip_ratio, shrink_step,
              max_clip_tokens, loss_dtype, identity) -> LayerPass:
    scale_pass, watch = _awq_scale_pass(alpha_step, max_tokens, scale_per_linear, loss_dtype, identity)
    layer_pass, description = _chained(
        "awq_full",
        scale_pass,
        partial(awq_clip_layer, min_clip_ratio=min_clip_ratio, shrink_step=shrink_step,
                max_clip_tokens=max_clip_tokens),
        scale_estimation=scale_estimation)
    return LayerPass(layer_pass, description, watch)


def _gptq(block_size, percdamp, act_order, static_groups, scale_estimation, hqq, block_scales,
          input_error) -> LayerPass:
    estimate_range = hqq_linear_range if hqq else _range_estimator(scale_estimation)
    layer_pass = partial(gptq_layer, block_size=block_size, percdamp=percdamp, act_order=act_order,
                         static_groups=static_groups, estimate_range=estimate_range, block_scales=block_scales,
                         input_error=input_error)
    return LayerPass(layer_pass, "gptq" + ("+scale_estimation" if scale_estimation else "") + ("+hqq" if hqq else "")
                     + ("" if block_scales == "max" else f"+{block_scales}") + ("+input_error" if input_error else ""))


def _scale_estimation(**options) -> LayerPass:
    return LayerPass(partial(scale_estimation_layer, estimate_range=_range_estimator(options)), "scale_estimation")


def _autoround(start, **options) -> LayerPass:
    """AutoRound from round-to-nearest, or (``start="gptq"``) from GPTQ + scale estimation's codes and grid."""
    if start == "rtn":
        return LayerPass(partial(autoround_layer, **options), "autoround")
    gptq_start = partial(gptq_layer, estimate_range=_range_estimator(True))
    return LayerPass(partial(autoround_layer, start_pass=gptq_start, **options), "gptq+scale_estimation+autoround")


def _svdquant(**options) -> LayerPass:
    return LayerPass(partial(svdquant_layer, **options), "svdquant")


def _lora_correction(**options) -> LayerPass:
    return LayerPass(partial(lora_correction_layer, **options), "lora_correction")


LAYER_PASSES: dict[str, Callable[..., LayerPass]] = {
    "awq_lite": _awq_lite,
    "awq_clip": _awq_clip,
    "awq_full": _awq_full,
    "gptq": _gptq,
    "scale_estimation": _scale_estimation,
    "autoround": _autoround,
    "svdquant": _svdquant,
    "lora_correction": _lora_correction,
}


def _layerwise(name: str, model: nn.Module, forward_loop: ForwardLoop, layer_inputs: str,
               **options) -> list[LayerReport]:
    step = LAYER_PASSES[name](**options)
    return run_layerwise(model, forward_loop, step.transform, step.description, step.watch, layer_inputs)


def layer_pass(name: str, options: dict | None = None) -> tuple[LayerPass, str]:
    """The per-block pass of layer-wise algorithm ``name`` with ``options`` (checked as ``run_algorithm``
    checks them), and its ``layer_inputs``: for runners that drive the blocks themselves (``lowbit.scale``)."""
    options = check_options(name, dict(options or {}))
    if name not in LAYER_PASSES:
        raise ValueError(f"algorithm {name!r} does not run block by block; allowed: {sorted(LAYER_PASSES)}")
    layer_inputs = options.pop("layer_inputs")
    return LAYER_PASSES[name](**options), layer_inputs


def _lsq(model: nn.Module, forward_loop: ForwardLoop, start: str, start_options: dict,
         **options) -> list[LayerReport] | None:
    """LSQ (``lowbit.algorithms.lsq``): the float model recorded, the start algorithm run, the steps tuned."""
    teacher = record_teacher(model, tunable_weights(model), forward_loop)
    report = run_algorithm(start, model, forward_loop, start_options)
    lsq(model, teacher, **options)
    return report


ALGORITHMS: dict[str, Callable[..., list[LayerReport] | None]] = {
    "max": max_calibrate,
    "smoothquant": smoothquant,
    **{name: partial(_layerwise, name) for name in LAYER_PASSES},
    "hqq": hqq,
    "block_scale_search": block_scale_search,
    "lsq": _lsq,
}
BUILT_IN = frozenset(ALGORITHMS)


def register_algorithm(name: str, function: Callable[..., list[LayerReport] | None], defaults: dict,
                       replace: bool = False) -> None:
    """Make ``function(model, forward_loop, **options)`` the calibration algorithm ``name`` (for ``quantize``,
    ``calibrate`` and configs' ``algorithm``), taking the options in ``defaults`` (each option's type is its
    default's). It runs on a quantized model with calibration data, layer-wise or not as it likes."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name={name!r}: expected a non-empty string")
    if not callable(function):
        raise TypeError(f"algorithm {name!r}: function={function!r} is not callable")
    if not isinstance(defaults, dict) or not all(isinstance(key, str) for key in defaults):
        raise TypeError(f"algorithm {name!r}: defaults={defaults!r}: expected a dict of option names to defaults")
    if name in ALGORITHMS and not replace:
        raise ValueError(f"algorithm {name!r} is already registered; pass replace=True to replace it")
    ALGORITHMS[name] = function
    DEFAULT_OPTIONS[name] = dict(defaults)


def unregister_algorithm(name: str) -> None:
    """Remove an algorithm added with ``register_algorithm`` (built-in algorithms stay)."""
    if name not in ALGORITHMS or name in BUILT_IN:
        raise ValueError(f"algorithm {name!r} was not added with register_algorithm: "
                         f"{sorted(set(ALGORITHMS) - BUILT_IN)}")
    del ALGORITHMS[name], DEFAULT_OPTIONS[name]


def run_algorithm(name: str, model: nn.Module, forward_loop: ForwardLoop | None,
                  options: dict | None = None) -> list[LayerReport] | None:
    """Run algorithm ``name`` with ``options`` (see the table above); returns the per-layer report."""
    options = check_options(name, dict(options or {}))
    _validate(name, model, forward_loop, options)
    return ALGORITHMS[name](model, forward_loop, **options)


def check_options(name: str, options: dict) -> dict:
    """``options`` over ``name``'s defaults, after checking their names, types and ranges (no model needed).

    An option's type is its default's: a bool option takes True or False, an int option an int (not a bool,
    not a float), a float option any int or float (not a bool), a string option a string; ``scale_estimation``
    takes a bool or a dict of scale estimation's options, checked the same way. ``lowbit.parse_config`` calls
    this, so a bad option fails before the model is touched.
    """
    if name not in ALGORITHMS:
        raise ValueError(f"unknown calibration algorithm {name!r}; allowed: {sorted(ALGORITHMS)}")
    _check_names_and_types(f"algorithm {name!r}", options, DEFAULT_OPTIONS[name])
    options = {**DEFAULT_OPTIONS[name], **options}
    if "alpha" in options:
        check_alpha(options["alpha"])
    if "layer_inputs" in options:
        check_layer_inputs(options["layer_inputs"])
    if "alpha_step" in options:
        alpha_grid(options["alpha_step"])
    if options.get("loss_dtype", "float32") not in LOSS_DTYPES:
        raise ValueError(f"algorithm {name!r}: loss_dtype={options['loss_dtype']!r}; allowed: {list(LOSS_DTYPES)}")
    if "min_clip_ratio" in options:
        clip_ratios(options["min_clip_ratio"], options["shrink_step"])
    for key in ("max_tokens", "max_clip_tokens", "block_size"):
        if options.get(key, 1) < 1:
            raise ValueError(f"algorithm {name!r}: {key}={options[key]!r} must be a positive int")
    if name == "hqq":
        check_hqq_options(options)
    if name == "block_scale_search":
        check_block_scale_search_options(options)
    if name == "autoround":
        check_autoround_options(options)
    if name == "lsq":
        check_lsq_options(options)
        if options["start"] == "lsq" or options["start"] not in ALGORITHMS:
            raise ValueError(f"lsq: start={options['start']!r}; allowed: {sorted(set(ALGORITHMS) - {'lsq'})}")
        check_options(options["start"], dict(options["start_options"]))
    if name == "svdquant":
        check_svdquant_options(options)
    if name == "lora_correction":
        check_lora_correction_options(options)
    if name == "gptq" and options["hqq"] and options["scale_estimation"] is not False:
        raise ValueError("algorithm 'gptq': hqq=True and scale_estimation both fix GPTQ's grid; choose one")
    if name == "gptq" and options["input_error"] and (options["hqq"] or options["scale_estimation"] is not False):
        raise ValueError("algorithm 'gptq': input_error=True changes the weight GPTQ rounds; the grids of hqq and "
                         "scale_estimation are fitted to the original weight: choose one")
    if name == "gptq" and options["block_scales"] not in BLOCK_SCALE_CHOICES:
        raise ValueError(f"algorithm 'gptq': block_scales={options['block_scales']!r}; allowed: "
                         f"{list(BLOCK_SCALE_CHOICES)}")
    if name == "gptq" and not options["percdamp"] > 0:
        raise ValueError(f"algorithm 'gptq': percdamp={options['percdamp']!r} must be a number > 0")
    estimation = _scale_estimation_options(name, options)
    if estimation is not None:
        start_ratios(estimation["min_ratio"], estimation["ratio_step"])
        check_steps(estimation["steps"])
        if estimation["objective"] not in OBJECTIVES:
            raise ValueError(f"scale_estimation: objective={estimation['objective']!r}; allowed: {list(OBJECTIVES)}")
    return options


def _check_names_and_types(where: str, options: dict, defaults: dict) -> None:
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"{where} got unknown options {unknown}; allowed: {sorted(defaults)}")
    for key, value in options.items():
        if key == "scale_estimation" and isinstance(value, dict):
            _check_names_and_types(f"{where}: scale_estimation", value, SCALE_ESTIMATION_OPTIONS)
        elif key == "scale_estimation" and not isinstance(value, bool):
            raise TypeError(f"{where}: scale_estimation={value!r}: expected True, False or a dict of scale "
                            f"estimation's options {sorted(SCALE_ESTIMATION_OPTIONS)}")
        else:
            check_type(f"{where}: {key}", value, type(defaults[key]))


def _validate(name: str, model: nn.Module, forward_loop: ForwardLoop | None, options: dict) -> None:
    """The checks that need the model and the data (``check_options`` has checked the options), before
    anything runs."""
    if name == "max":
        return
    if name == "hqq":
        hqq_weights(model)
        return
    if name == "block_scale_search":
        searchable_weights(model, options["search"])
        return
    if forward_loop is None:
        raise ValueError(f"algorithm {name!r} needs calibration data: forward_loop is None")
    if name == "lsq":
        tunable_weights(model)
        start_options = check_options(options["start"], dict(options["start_options"]))
        _validate(options["start"], model, forward_loop, start_options)
        return
    estimation = _scale_estimation_options(name, options)
    for stack_name, layers in require_block_stacks(model, f"algorithm {name!r}"):
        for index, layer in enumerate(layers):
            if name == "autoround":
                tunable_weights(layer, f"{stack_name}.{index}.")
            if name in ("svdquant", "lora_correction"):
                svdquant_weights(layer, f"{stack_name}.{index}.", check_scaled=name == "svdquant")
            for weight_name, weight in row_weights(layer).items():
                if weight.weight_quantizer.is_enabled:
                    _check_weight_quantizer(name, options, estimation is not None, weight,
                                            f"{stack_name}.{index}.{weight_name}.weight_quantizer")


def _scale_estimation_options(name: str, options: dict) -> dict | None:
    """Scale estimation's options with defaults, as run alone or chained; None when it does not run."""
    if name == "scale_estimation":
        return options
    chained = options.get("scale_estimation", False)
    if chained is False:
        return None
    if chained is True:
        return dict(SCALE_ESTIMATION_OPTIONS)
    return {**SCALE_ESTIMATION_OPTIONS, **chained}


def _check_weight_quantizer(name: str, options: dict, estimates: bool, linear: QuantizableWeight,
                            full_name: str) -> None:
    """ValueError if the algorithm cannot work on this linear's (enabled) weight quantizer."""
    estimates = estimates or options.get("hqq", False)
    if name == "gptq" and is_micro_scaled(linear.weight_quantizer):
        _check_micro_scaled(options, estimates, linear, full_name)
        return
    if name == "gptq" and options["block_scales"] != "max":
        raise ValueError(f"{full_name}: gptq block_scales={options['block_scales']!r} applies to NVFP4 / MX "
                         "weights only; integer grids take scale_estimation or hqq")
    if estimates:
        estimation_group_size(linear, full_name)
    if name in ("awq_clip", "awq_full"):
        weight_group_size(linear, full_name, per_row=True)
    if name != "gptq":
        return
    group_size = gptq_group_size(linear, full_name)
    if options["act_order"] and not options["static_groups"] and not estimates and group_size < linear.in_features:
        raise ValueError(f"{full_name}: act_order=True with group-wise scales needs static_groups=True (or "
                         "scale_estimation, whose grid is fixed before GPTQ)")


def _check_micro_scaled(options: dict, estimates: bool, linear: QuantizableWeight, full_name: str) -> None:
    """ValueError if GPTQ's options do not fit this NVFP4 / MX weight quantizer (``gptq_micro``)."""
    if estimates:
        raise ValueError(f"{full_name}: scale_estimation and hqq fix an integer grid; NVFP4 / MX weights choose "
                         "their block scales with gptq's block_scales option")
    micro_block_size(linear, full_name, options["block_scales"])
    if options["act_order"] and not options["static_groups"]:
        raise ValueError(f"{full_name}: act_order=True with NVFP4 / MX blocks needs static_groups=True (each "
                         "block stays a contiguous slab of the original columns)")
    if options["block_scales"] == "loss" and options["static_groups"]:
        raise ValueError(f"{full_name}: gptq block_scales='loss' ranks a block's scales by GPTQ's loss from its "
                         "current weights; it needs static_groups=False")
