"""Ready-made configs with ModelOpt's names and contents (plain dicts: ``copy.deepcopy`` and edit).

Every preset leaves the quantizers it does not name disabled (``"default": {"enable": False}``) and
keeps the output head and MoE routers in high precision, as ModelOpt's presets do.
"""

from __future__ import annotations

import copy

FP8 = (4, 3)
NVFP4_BLOCK = {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}
MX_BLOCK = {-1: 32, "type": "dynamic", "scale_bits": (8, 0)}

_HIGH_PRECISION = {
    "*lm_head*": {"enable": False},
    "*output_layer*": {"enable": False},
    "*router*": {"enable": False},
    "*block_sparse_moe.gate*": {"enable": False},
    "*mlp.gate.*": {"enable": False},
    "*shared_expert_gate*": {"enable": False},
    "default": {"enable": False},
}


def _preset(weight, activation, algorithm="max") -> dict:
    quant_cfg = {"*weight_quantizer": weight}
    quant_cfg["*input_quantizer"] = activation if activation is not None else {"enable": False}
    quant_cfg.update(copy.deepcopy(_HIGH_PRECISION))
    return {"quant_cfg": quant_cfg, "algorithm": algorithm}


INT8_DEFAULT_CFG = _preset({"num_bits": 8, "axis": 0}, {"num_bits": 8, "axis": None})
INT8_SMOOTHQUANT_CFG = _preset(  # alpha 1.0: ModelOpt's default for its preset of this name
    {"num_bits": 8, "axis": 0}, {"num_bits": 8, "axis": None}, {"method": "smoothquant", "alpha": 1.0}
)
INT8_WEIGHT_ONLY_CFG = _preset({"num_bits": 8, "axis": 0}, None)
FP8_DEFAULT_CFG = _preset({"num_bits": FP8, "axis": None}, {"num_bits": FP8, "axis": None})
FP8_PER_CHANNEL_PER_TOKEN_CFG = _preset(
    {"num_bits": FP8, "axis": 0},
    {"num_bits": FP8, "block_sizes": {-1: None, "type": "dynamic"}},
)
# ModelOpt's awq_lite: one scale per linear (its input quantizer's pre_quant_scale), every calibration token
# scored. Measured on the bundled model against one scale per input group (with quantized layer inputs):
# INT4_AWQ d ppl 1.07 -> 0.87, W4A8 1.15 -> 0.97 (bench/results).
AWQ_LITE_AS_MODELOPT = {"method": "awq_lite", "alpha_step": 0.1, "scale_per_linear": True, "max_tokens": 16384}
INT4_BLOCKWISE_WEIGHT_ONLY_CFG = _preset({"num_bits": 4, "block_sizes": {-1: 128}}, None)
# 3- and 2-bit weights need a zero point: symmetric codes waste one of their 8 (or 4) levels on a sign
# that a group's range rarely splits evenly.
INT3_BLOCKWISE_WEIGHT_ONLY_CFG = _preset({"num_bits": 3, "block_sizes": {-1: 128}, "asymmetric": True}, None)
INT2_BLOCKWISE_WEIGHT_ONLY_CFG = _preset({"num_bits": 2, "block_sizes": {-1: 64}, "asymmetric": True}, None)
INT4_AWQ_CFG = _preset(
    {"num_bits": 4, "block_sizes": {-1: 128, "type": "static"}},
    None,
    AWQ_LITE_AS_MODELOPT,
)
W4A8_AWQ_BETA_CFG = _preset(
    [{"num_bits": 4, "block_sizes": {-1: 128, "type": "static"}}, {"num_bits": FP8, "axis": None}],
    {"num_bits": FP8, "axis": None},
    AWQ_LITE_AS_MODELOPT,
)
NVFP4_DEFAULT_CFG = _preset(
    {"num_bits": (2, 1), "block_sizes": NVFP4_BLOCK}, {"num_bits": (2, 1), "block_sizes": NVFP4_BLOCK}
)
NVFP4_AWQ_LITE_CFG = _preset(
    {"num_bits": (2, 1), "block_sizes": NVFP4_BLOCK},
    {"num_bits": (2, 1), "block_sizes": NVFP4_BLOCK},
    AWQ_LITE_AS_MODELOPT,
)
W4A16_NVFP4_CFG = _preset({"num_bits": (2, 1), "block_sizes": NVFP4_BLOCK}, None)
MXFP8_DEFAULT_CFG = _preset({"num_bits": FP8, "block_sizes": MX_BLOCK}, {"num_bits": FP8, "block_sizes": MX_BLOCK})
MXFP4_DEFAULT_CFG = _preset(
    {"num_bits": (2, 1), "block_sizes": MX_BLOCK}, {"num_bits": (2, 1), "block_sizes": MX_BLOCK}
)
FP8_KV_CFG = {
    "quant_cfg": {
        "*[kv]_bmm_quantizer": {"num_bits": FP8, "axis": None, "enable": True},
        "default": {"enable": False},
    },
    "algorithm": "max",
}

PRESETS = {
    name: value
    for name, value in globals().items()
    if name.endswith("_CFG") and isinstance(value, dict)
}


def get_preset(name: str) -> dict:
    """A deep copy of a preset by name (``"INT4_AWQ_CFG"``, case-insensitive, ``_CFG`` optional)."""
    key = name.upper()
    key = key if key.endswith("_CFG") else key + "_CFG"
    if key not in PRESETS:
        raise ValueError(f"preset {name!r} is unknown; allowed are {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[key])
