"""The calibration algorithms by name: ``run_algorithm(name, model, forward_loop, options)``.

"max" is plain max calibration (``lowbit.convert.max_calibrate``); the others run layer by layer
(``lowbit.calib.layerwise``) and return one :class:`LayerReport` per decoder layer.

==============  =========================================================================  ============
name            options (defaults)                                                         module
==============  =========================================================================  ============
max             none                                                                       convert
smoothquant     alpha=0.5                                                                  smoothquant
awq_lite        alpha_step=0.1, max_tokens=4096                                            awq
awq_clip        min_clip_ratio=0.5, shrink_step=0.05, max_clip_tokens=512                  awq
awq_full        awq_lite's and awq_clip's options                                          awq
gptq            block_size=128, percdamp=0.01, act_order=False, static_groups=False        gptq
==============  =========================================================================  ============

Options are validated, and the weight quantizers checked, before the model is touched.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from lowbit.calib.awq import alpha_grid, awq_clip_layer, awq_scale_layer, clip_ratios
from lowbit.calib.gptq import gptq_layer
from lowbit.calib.layerwise import LayerReport, find_decoder_layers, quantized_linears, run_layerwise
from lowbit.calib.smoothquant import check_alpha, smoothquant
from lowbit.calib.weights import weight_group_size

ForwardLoop = Callable[[nn.Module], None]

AWQ_LITE_OPTIONS = {"alpha_step": 0.1, "max_tokens": 4096}
AWQ_CLIP_OPTIONS = {"min_clip_ratio": 0.5, "shrink_step": 0.05, "max_clip_tokens": 512}
DEFAULT_OPTIONS: dict[str, dict] = {
    "max": {},
    "smoothquant": {"alpha": 0.5},
    "awq_lite": AWQ_LITE_OPTIONS,
    "awq_clip": AWQ_CLIP_OPTIONS,
    "awq_full": {**AWQ_LITE_OPTIONS, **AWQ_CLIP_OPTIONS},
    "gptq": {"block_size": 128, "percdamp": 0.01, "act_order": False, "static_groups": False},
}


def _max(model: nn.Module, forward_loop: ForwardLoop | None) -> None:
    from lowbit.convert import max_calibrate

    max_calibrate(model, forward_loop)


def _awq_lite(model, forward_loop, alpha_step, max_tokens):
    layer_pass = partial(awq_scale_layer, alpha_step=alpha_step, max_tokens=max_tokens)
    return run_layerwise(model, forward_loop, layer_pass, "awq_lite")


def _awq_clip(model, forward_loop, min_clip_ratio, shrink_step, max_clip_tokens):
    layer_pass = partial(awq_clip_layer, min_clip_ratio=min_clip_ratio, shrink_step=shrink_step,
                         max_clip_tokens=max_clip_tokens)
    return run_layerwise(model, forward_loop, layer_pass, "awq_clip")


def _awq_full(model, forward_loop, alpha_step, max_tokens, min_clip_ratio, shrink_step, max_clip_tokens):
    def layer_pass(layer, inputs):
        awq_scale_layer(layer, inputs, alpha_step=alpha_step, max_tokens=max_tokens)
        awq_clip_layer(layer, inputs, min_clip_ratio=min_clip_ratio, shrink_step=shrink_step,
                       max_clip_tokens=max_clip_tokens)

    return run_layerwise(model, forward_loop, layer_pass, "awq_full")


def _gptq(model, forward_loop, block_size, percdamp, act_order, static_groups):
    layer_pass = partial(gptq_layer, block_size=block_size, percdamp=percdamp, act_order=act_order,
                         static_groups=static_groups)
    return run_layerwise(model, forward_loop, layer_pass, "gptq")


ALGORITHMS: dict[str, Callable[..., list[LayerReport] | None]] = {
    "max": _max,
    "smoothquant": smoothquant,
    "awq_lite": _awq_lite,
    "awq_clip": _awq_clip,
    "awq_full": _awq_full,
    "gptq": _gptq,
}


def run_algorithm(name: str, model: nn.Module, forward_loop: ForwardLoop | None,
                  options: dict | None = None) -> list[LayerReport] | None:
    """Run algorithm ``name`` with ``options`` (see the table above); returns the per-layer report."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown calibration algorithm {name!r}; allowed: {sorted(ALGORITHMS)}")
    options = dict(options or {})
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS[name]))
    if unknown:
        raise ValueError(f"algorithm {name!r} got unknown options {unknown}; allowed: {sorted(DEFAULT_OPTIONS[name])}")
    options = {**DEFAULT_OPTIONS[name], **options}
    _validate(name, model, forward_loop, options)
    return ALGORITHMS[name](model, forward_loop, **options)


def _validate(name: str, model: nn.Module, forward_loop: ForwardLoop | None, options: dict) -> None:
    """Every check that can fail, before anything runs."""
    if name == "max":
        return
    if forward_loop is None:
        raise ValueError(f"algorithm {name!r} needs calibration data: forward_loop is None")
    if "alpha" in options:
        check_alpha(options["alpha"])
    if "alpha_step" in options:
        alpha_grid(options["alpha_step"])
    if "min_clip_ratio" in options:
        clip_ratios(options["min_clip_ratio"], options["shrink_step"])
    for key in ("max_tokens", "max_clip_tokens", "block_size"):
        value = options.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"algorithm {name!r}: {key}={value!r} must be a positive int")
    if name == "gptq" and not (isinstance(options["percdamp"], (int, float)) and options["percdamp"] > 0):
        raise ValueError(f"algorithm 'gptq': percdamp={options['percdamp']!r} must be a number > 0")
    layers_name, layers = find_decoder_layers(model)
    if name in ("gptq", "awq_clip", "awq_full"):
        for index, layer in enumerate(layers):
            for linear_name, linear in quantized_linears(layer).items():
                if linear.weight_quantizer.is_enabled:
                    full_name = f"{layers_name}.{index}.{linear_name}.weight_quantizer"
                    group_size = weight_group_size(linear, full_name, per_row=name != "gptq")
                    if name == "gptq" and options["act_order"] and not options["static_groups"] and (
                            group_size < linear.in_features):
                        raise ValueError(
                            f"{full_name}: act_order=True with group-wise scales needs static_groups=True"
                        )
