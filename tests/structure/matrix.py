"""One cell of the support matrix: quantize a tiny family model with a preset and an algorithm, and check it.

Algorithms: ``max`` (a preset as given, when its algorithm is max), ``awq`` (a preset whose algorithm
is AWQ), ``smoothquant`` (INT8_SMOOTHQUANT_CFG), ``gptq`` (INT4_BLOCKWISE_WEIGHT_ONLY_CFG with static
blocks and GPTQ). A cell's row (:func:`run_case`) says ``ok`` or the config error, the weights left
float, and for the block-wise algorithms every block's output MSE with max calibration and after.
"""

from __future__ import annotations

import copy
import fnmatch

import torch

from lowbit.algorithms.registry import run_algorithm
from lowbit.convert import quantize
from lowbit.modules.registry import is_quantized
from lowbit.presets import PRESETS
from lowbit.structure.weights import is_weight_module, quantizable_weights
from tests.structure.families import FAMILIES, batches, build

BLOCKWISE = ("awq", "gptq")
ALGORITHM_LABEL = {"max": "max", "smoothquant": "smoothquant", "awq_lite": "awq", "awq_full": "awq",
                   "gptq": "gptq"}
GPTQ_PRESET = "INT4_BLOCKWISE_WEIGHT_ONLY_CFG"


def preset_algorithm(preset: str) -> str:
    algorithm = PRESETS[preset]["algorithm"]
    method = algorithm["method"] if isinstance(algorithm, dict) else algorithm
    return ALGORITHM_LABEL[method]


def case_config(preset: str, algorithm: str) -> dict:
    """The config of a cell: the preset itself, or for ``gptq`` its INT4 preset with static blocks."""
    config = copy.deepcopy(PRESETS[preset])
    if algorithm == "gptq":
        config["quant_cfg"]["*weight_quantizer"]["block_sizes"] = {-1: 128, "type": "static"}
        config["algorithm"] = "gptq"
    return config


def all_cases() -> list[tuple[str, str, str]]:
    """(family, preset, algorithm) for every family x every preset with its own algorithm, plus GPTQ."""
    return [(family, preset, preset_algorithm(preset)) for family in FAMILIES for preset in sorted(PRESETS)] + \
        [(family, GPTQ_PRESET, "gptq") for family in FAMILIES]


def ci_cases() -> list[tuple[str, str, str]]:
    """The CI subset: every family with every algorithm (AWQ presets taking turns), two max presets per
    family taking turns so that every preset runs on several families."""
    max_presets = sorted(p for p in PRESETS if preset_algorithm(p) == "max")
    awq_presets = sorted(p for p in PRESETS if preset_algorithm(p) == "awq")
    cases = []
    for index, family in enumerate(FAMILIES):
        cases += [(family, max_presets[(2 * index + k) % len(max_presets)], "max") for k in range(2)]
        cases.append((family, awq_presets[index % len(awq_presets)], "awq"))
        cases.append((family, "INT8_SMOOTHQUANT_CFG", "smoothquant"))
        cases.append((family, GPTQ_PRESET, "gptq"))
    return cases


def float_weights(model: torch.nn.Module) -> list[str]:
    """Names of the weight quantizers left disabled (the rest are enabled)."""
    return sorted(name for name, weight in quantizable_weights(model).items() if not weight.weight_quantizer.is_enabled)


def run_case(family: str, preset: str, algorithm: str) -> dict:
    """Quantize the family's model as the cell says; the row (module docstring) and the checks' inputs."""
    model, data = build(family), batches(family)
    config = case_config(preset, algorithm)
    method = config["algorithm"]["method"] if isinstance(config["algorithm"], dict) else config["algorithm"]
    options = {k: v for k, v in config["algorithm"].items() if k != "method"} if isinstance(
        config["algorithm"], dict) else {}
    row = {"family": family, "preset": preset, "algorithm": algorithm}
    forward_loop = lambda m: [m(**batch) for batch in data]  # noqa: E731
    try:
        if algorithm in BLOCKWISE:  # the same path as quantize(), with the per-block report kept
            quantize(model, {**config, "algorithm": None})
            report = run_algorithm(method, model, forward_loop, options)
            row["blocks"] = [(entry.name, entry.mse_max, entry.mse_after) for entry in report]
        else:
            quantize(model, config, forward_loop)
    except ValueError as error:
        row.update(status="error", error=str(error).split("\n")[0], quantized=any(map(is_quantized, model.modules())))
        return row
    with torch.no_grad():
        output = model(**data[0])
    logits = output.logits if hasattr(output, "logits") else output if torch.is_tensor(output) else output[0]
    row.update(status="ok", finite=bool(torch.isfinite(logits).all()), float_weights=float_weights(model),
               weights=list(quantizable_weights(model)),
               unconverted=[n for n, m in model.named_modules() if is_weight_module(m) and not is_quantized(m)])
    return row


def expected_float(family: str, preset: str, model_names: list[str]) -> list[str]:
    """The weight quantizers a preset leaves float on purpose: those matching its disable rules (lm_head,
    routers, ...) and the family's skipped patterns."""
    rules = [key for key, value in PRESETS[preset]["quant_cfg"].items()
             if isinstance(value, dict) and value.get("enable") is False and key != "default"]
    patterns = rules + list(FAMILIES[family].skipped)
    return sorted(name for name in model_names if any(fnmatch.fnmatchcase(name, p) for p in patterns))
