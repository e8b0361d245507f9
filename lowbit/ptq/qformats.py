"""``lowbit ptq``'s format names (ModelOpt hf_ptq's ``--qformat`` / ``--kv_cache_qformat``) and what each means.

A qformat is a preset (``lowbit.presets``) plus, for ``int4_gptq``, the GPTQ algorithm; a KV-cache qformat adds
rules for the attention modules' ``k_bmm_quantizer`` / ``v_bmm_quantizer`` (static per-tensor FP8, or NVFP4:
dynamic E2M1 blocks of 16 with E4M3 block scales under a calibrated per-tensor amax).

``EXPORTS[qformat]`` lists the export formats that can hold that qformat's layers, measured on the bundled model
by tests/ptq/test_qformats.py (AWQ and SmoothQuant keep a ``pre_quant_scale`` per linear, which
compressed-tensors cannot store; MXFP4 has no ModelOpt or compressed-tensors layout in lowbit, so its only
export is lowbit's own packed checkpoint, ``"lowbit"``). ``KV_EXPORTS`` lists the exports that store each
KV-cache format. The first entry of ``EXPORTS[qformat]`` is the default export. GGUF and ONNX are not offered
by ``lowbit ptq`` yet: their exporters take a tokenizer / sample input and the table was not yet checked for
them (``lowbit quantize --export-format gguf|onnx`` writes them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.presets import FP8, NVFP4_BLOCK, get_preset
from lowbit.search.auto import native_bf16_matmuls

KV_QUANTIZERS = "*[kv]_bmm_quantizer"
AWQ_SCALE_SEARCHES = ("awq_lite", "awq_full")
LOWBIT_EXPORT = "lowbit"  # lowbit's own packed checkpoint (lowbit.hf.save_quantized(packed=True))


@dataclass(frozen=True)
class QFormat:
    """One ``--qformat``: the preset it takes and the algorithm replacing the preset's (None: the preset's)."""

    name: str
    preset: str
    algorithm: str | None = None

    def config(self) -> dict:
        config = get_preset(self.preset)
        if self.algorithm is not None:
            config["algorithm"] = self.algorithm
        return config


QFORMATS = {q.name: q for q in (
    QFormat("fp8", "FP8_DEFAULT_CFG"),
    QFormat("fp8_pc_pt", "FP8_PER_CHANNEL_PER_TOKEN_CFG"),
    QFormat("int8_sq", "INT8_SMOOTHQUANT_CFG"),
    QFormat("int8_wo", "INT8_WEIGHT_ONLY_CFG"),
    QFormat("int4_wo", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG"),
    QFormat("int4_awq", "INT4_AWQ_CFG"),
    QFormat("int4_gptq", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "gptq"),
    QFormat("w4a8_awq", "W4A8_AWQ_BETA_CFG"),
    QFormat("nvfp4", "NVFP4_DEFAULT_CFG"),
    QFormat("nvfp4_awq", "NVFP4_AWQ_LITE_CFG"),
    QFormat("w4a16_nvfp4", "W4A16_NVFP4_CFG"),
    QFormat("mxfp8", "MXFP8_DEFAULT_CFG"),
    QFormat("mxfp4", "MXFP4_DEFAULT_CFG"),
)}

KV_QFORMATS = {
    "fp8": {"num_bits": FP8, "axis": None, "enable": True},
    "nvfp4": {"num_bits": (2, 1), "block_sizes": dict(NVFP4_BLOCK), "enable": True},
    "none": None,
}

_HF_CT = ("hf", "compressed-tensors", LOWBIT_EXPORT)
_HF = ("hf", LOWBIT_EXPORT)
EXPORTS = {
    "fp8": _HF_CT,
    "fp8_pc_pt": _HF_CT,
    "int8_sq": _HF,
    "int8_wo": _HF_CT,
    "int4_wo": _HF_CT,
    "int4_awq": _HF,
    "int4_gptq": _HF_CT,
    "w4a8_awq": _HF,
    "nvfp4": _HF_CT,
    "nvfp4_awq": _HF,
    "w4a16_nvfp4": _HF_CT,
    "mxfp8": _HF,
    "mxfp4": (LOWBIT_EXPORT,),
}
KV_EXPORTS = {"fp8": ("hf", "compressed-tensors", LOWBIT_EXPORT), "nvfp4": ("hf", LOWBIT_EXPORT), "none": None}


def check_choice(option: str, value: str, allowed) -> str:
    """``value`` if it is one of ``allowed``, else ValueError naming the option, the value and the allowed set."""
    if value not in allowed:
        raise ValueError(f"{option} {value!r} is unknown; allowed are {', '.join(allowed)}")
    return value


def ptq_config(qformat: str, kv_qformat: str = "none") -> dict:
    """The quantize config of ``--qformat`` with ``--kv-cache-qformat``'s rules added (ModelOpt dict shape)."""
    check_choice("--qformat", qformat, QFORMATS)
    check_choice("--kv-cache-qformat", kv_qformat, KV_QFORMATS)
    config = QFORMATS[qformat].config()
    if KV_QFORMATS[kv_qformat] is not None:
        config["quant_cfg"][KV_QUANTIZERS] = dict(KV_QFORMATS[kv_qformat])
    return config


def default_export(qformat: str) -> str:
    """The export ``--export-format`` defaults to: ModelOpt's unified HF checkpoint where it holds the format."""
    return EXPORTS[check_choice("--qformat", qformat, QFORMATS)][0]


def check_export(qformat: str, kv_qformat: str, export_format: str) -> None:
    """ValueError before any work when ``export_format`` cannot hold the qformat's layers or its KV cache."""
    if export_format not in EXPORTS[qformat]:
        raise ValueError(f"--export-format {export_format!r} cannot hold --qformat {qformat!r} layers; "
                         f"allowed for it are {', '.join(EXPORTS[qformat])}")
    kv_exports = KV_EXPORTS[kv_qformat]
    if kv_exports is not None and export_format not in kv_exports:
        raise ValueError(f"--export-format {export_format!r} cannot hold a {kv_qformat} KV cache "
                         f"(--kv-cache-qformat {kv_qformat}); allowed for it are {', '.join(kv_exports)}")


def with_search_precision(config: dict, device: str) -> dict:
    """``config`` with an AWQ scale search comparing its candidates in bfloat16 where ``device`` multiplies bfloat16
    matrices natively (``native_bf16_matmuls``; ``loss_dtype``, ``lowbit.algorithms.awq.search_awq_scale``), as
    ModelOpt's awq_lite computes its loss in a bf16 model's dtype and lowbit's auto_quantize searches do. The
    search's ``(D G) * D`` products, ~70 % of its CPU time in float32 on the ptq bench model, run ~4x faster;
    each loss moves by ~0.1 %, so only candidates closer than that can swap (measured: none on the bundled and
    the bench model, bench/results/ptq_vs_modelopt_cpu_2026-12-07b.md). Any other algorithm: ``config`` as is."""
    algorithm = config.get("algorithm")
    if not (isinstance(algorithm, dict) and algorithm.get("method") in AWQ_SCALE_SEARCHES
            and native_bf16_matmuls(torch.device(device))):
        return config
    return {**config, "algorithm": {**algorithm, "loss_dtype": "bfloat16"}}
