"""Loading a quantized KV cache back from an export: k/v scales -> the attention modules' bmm quantizers.

Both exports store one scale per attention module and per k / v, ``scale = amax / 448`` (float32):
ModelOpt's unified checkpoint as ``<attention>.k_proj.k_scale`` / ``<attention>.v_proj.v_scale`` with
``kv_cache_quant_algo`` FP8 or NVFP4, compressed-tensors as ``<attention>.k_scale`` / ``<attention>.v_scale``
with an FP8 ``kv_cache_scheme``. The attention module is converted to lowbit's quantized attention
(``lowbit.modules.attention``) with ``amax = 448 * scale`` and the format the algo names: FP8 E4M3 per tensor
(static), or NVFP4 (E2M1 blocks of 16 along head_dim, dynamic E4M3 block scales under that per-tensor amax).
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.modules.registry import convert_module, is_quantized
from lowbit.presets import FP8, NVFP4_BLOCK
from lowbit.quantizer import TensorQuantizer

KV_SCALE_BOUND = 448.0
KV_FORMATS = {"FP8": {"num_bits": FP8}, "NVFP4": {"num_bits": (2, 1), "block_sizes": NVFP4_BLOCK}}
SUFFIXES = {"modelopt": (".k_proj.k_scale", ".v_proj.v_scale"), "compressed-tensors": (".k_scale", ".v_scale")}


def pop_kv_scales(tensors: dict[str, torch.Tensor], method: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{attention module name: (k_scale, v_scale)}, removed from ``tensors``; ValueError when one is missing."""
    k_suffix, v_suffix = SUFFIXES[method]
    scales = {}
    for key in [key for key in tensors if key.endswith(k_suffix)]:
        attention = key[: -len(k_suffix)]
        if attention + v_suffix not in tensors:
            raise ValueError(f"{key} has no matching {attention + v_suffix}: an export stores k and v scales both")
        scales[attention] = (tensors.pop(key), tensors.pop(attention + v_suffix))
    return scales


def restore_kv_cache(model: nn.Module, scales: dict[str, tuple[torch.Tensor, torch.Tensor]], algo: str) -> None:
    """Give each attention module in ``scales`` k/v quantizers of ``algo`` (FP8 / NVFP4) with amax = 448 * scale."""
    if algo not in KV_FORMATS:
        raise ValueError(f"KV cache algo {algo!r}: load_quantized restores {sorted(KV_FORMATS)}")
    if not scales:
        raise ValueError(f"the export declares a {algo} KV cache but holds no k/v scales")
    for name, (k_scale, v_scale) in scales.items():
        attention = model.get_submodule(name)
        if not is_quantized(attention):
            convert_module(attention)  # TypeError naming the class when it is no supported HF attention
        for slot, scale in (("k_bmm_quantizer", k_scale), ("v_bmm_quantizer", v_scale)):
            quantizer = TensorQuantizer(KV_FORMATS[algo])
            quantizer.set_amax(scale.float().reshape(()) * KV_SCALE_BOUND)
            setattr(attention, slot, quantizer)
        attention.q_bmm_quantizer.disable()
