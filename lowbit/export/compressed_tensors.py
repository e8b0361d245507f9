"""compressed-tensors checkpoints: what llm-compressor writes and vLLM and transformers load.

Each quantized linear ``L`` is written in one of four formats (``x_hat = (q - zero_point) * weight_scale``,
scales are divisors; the package ``compressed-tensors`` is the reference for the layout, not a dependency):

| format               | tensors                                                                          |
|----------------------|----------------------------------------------------------------------------------|
| pack-quantized       | L.weight_packed int32 (N, ceil(K b / 32)): codes + 2**(b-1) offset binary, code  |
| (W4A16, W8A16)       | j of a row at bits b*j (32 / b per word, low bits first); L.weight_scale (N, K/g)|
|                      | or (N, 1); L.weight_shape int64 [N, K] (symmetric: no zero point)                |
| int-quantized (W8A8) | L.weight int8 (N, K), L.weight_scale (N, 1); static input: L.input_scale (1,)    |
| float-quantized (FP8)| L.weight float8_e4m3fn (N, K), L.weight_scale (1,) / (N, 1) / (N/128, K/128);    |
|                      | static input: L.input_scale (1,)                                                 |
| nvfp4-pack-quantized | L.weight_packed uint8 (N, K/2) E2M1 low nibble first, L.weight_scale e4m3 (N,    |
|                      | K/16), L.weight_global_scale (1,) = 448 * 6 / amax (an inverse); NVFP4           |
|                      | activations: L.input_global_scale (1,) = 448 * 6 / input amax                    |

Asymmetric integers are refused: transformers 5.25 with compressed-tensors 0.20 rejects the packed zero
points' shape on load (measured), so lowbit does not write a layout no consumer here reads back.
``config.json`` gets ``quantization_config``: ``quant_method: "compressed-tensors"``, ``format``,
``quantization_status: "compressed"``, ``config_groups`` (one scheme: targets ``["Linear"]`` with the
unquantized linears in ``ignore``; several: one group per scheme with the layer names as targets, format
``mixed-precision``), ``kv_cache_scheme`` with ``<attention>.k_scale`` / ``v_scale`` for a static FP8 cache.
Scales are float32 (bit-exact to lowbit's amax / qmax).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lowbit import formats
from lowbit.attributes import QuantizerAttributeConfig
from lowbit.export.layers import QuantizedLinear, export_state_dict, kv_cache_quantizers, quantized_linears
from lowbit.export.model_files import save_model_files
from lowbit.export.modelopt_hf import maxbound
from lowbit.files import atomic_directory
from lowbit.version import __version__

TENSOR_FILE = "model.safetensors"
NVFP4_RANGE = formats.E2M1.max_value * formats.E4M3.max_value  # 6 * 448
NVFP4_GROUPS = {"group_size": 16, "scale_dtype": "torch.float8_e4m3fn", "zp_dtype": "torch.float8_e4m3fn"}


def pack_int32(codes: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Signed codes (R, C) in [-2**(b-1), 2**(b-1)) -> int32 (R, ceil(C b / 32)): code + 2**(b-1) of column j
    at bits b*j of its row (words in order, low bits first; a code may straddle two words)."""
    rows, columns = codes.shape
    unsigned = (codes.to(torch.int64) + (1 << (num_bits - 1))) & ((1 << num_bits) - 1)
    words = -(-columns * num_bits // 32)
    bits = torch.zeros(rows, words * 32 + num_bits, dtype=torch.int64)
    for bit in range(num_bits):  # scatter each code's bit i to its absolute position in the row
        position = torch.arange(columns) * num_bits + bit
        bits[:, position] = (unsigned >> bit) & 1
    weights = 1 << torch.arange(32, dtype=torch.int64)
    packed = (bits[:, : words * 32].reshape(rows, words, 32) * weights).sum(-1)
    return torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)


def unpack_int32(packed: torch.Tensor, num_bits: int, columns: int) -> torch.Tensor:
    """Inverse of ``pack_int32``: int32 (R, W) -> int8 signed codes (R, columns)."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    bits = ((words.unsqueeze(-1) >> torch.arange(32)) & 1).flatten(1)
    position = torch.arange(columns).unsqueeze(1) * num_bits + torch.arange(num_bits)
    unsigned = (bits[:, position] << torch.arange(num_bits)).sum(-1)
    return (unsigned - (1 << (num_bits - 1))).to(torch.int8)


def _args(config: QuantizerAttributeConfig, strategy: str, dynamic: bool, **extra) -> dict:
    """A compressed-tensors QuantizationArgs dict."""
    if config.block_scale_bits == (4, 3):
        num_bits, kind = 4, "float"
    else:
        num_bits, kind = (8, "float") if config.is_float else (config.num_bits, "int")
    return {"num_bits": num_bits, "type": kind, "symmetric": not config.asymmetric, "strategy": strategy,
            "dynamic": dynamic, "group_size": None, "block_structure": None, "actorder": None,
            "observer": None if dynamic else "minmax", "observer_kwargs": {}, **extra}


def weight_args(layer: QuantizedLinear) -> dict:
    """The weight QuantizationArgs of a layer; ValueError naming the layer when compressed-tensors has none."""
    config = layer.config
    if len(layer.stages) > 1:
        raise ValueError(f"{layer.name}: a two-stage weight quantizer (W4A8) has no compressed-tensors format")
    if config.block_scale_bits == (4, 3):
        return _args(config, "tensor_group", False, **NVFP4_GROUPS)
    blocks = layer.block_dims()
    if config.num_bits == (4, 3) and blocks is not None:
        return _args(config, "block", False, block_structure=list(blocks))
    if config.block_scale_bits is None and (config.num_bits == (4, 3) or not config.is_float):
        fmt = layer.weight_format()
        if not config.is_float and (config.unsigned or config.narrow_range or config.asymmetric):
            raise ValueError(f"{layer.name}: {config.format_name} (asymmetric / unsigned / narrow range) has no "
                             "compressed-tensors export in lowbit; use signed symmetric integers")
        if fmt.block_size is not None:
            return _args(config, "group", False, group_size=fmt.block_size)
        return _args(config, "channel" if fmt.per_channel else "tensor", False)
    raise ValueError(f"{layer.name}: weights {config.format_name} {config.granularity} have no compressed-tensors "
                     "format; expressible are INT2-8 (tensor, channel, groups), FP8 E4M3 (tensor, channel, "
                     "2-D blocks) and NVFP4")


def input_args(layer: QuantizedLinear, weights: dict) -> dict | None:
    """The input-activation QuantizationArgs, None when activations are not quantized."""
    quantizer = layer.input_quantizer
    if quantizer is None:
        return None
    config = quantizer.config
    same_kind = ("float" if config.is_float else "int") == weights["type"]
    if config.block_scale_bits == (4, 3) and weights["strategy"] == "tensor_group":
        return _args(config, "tensor_group", "local", **NVFP4_GROUPS)
    if same_kind and config.num_bits in (8, (4, 3)) and not config.asymmetric and config.block_scale_bits is None:
        if config.block_sizes is None and config.axis is None and not config.is_dynamic:
            return _args(config, "tensor", False)
        if config.block_axes == {-1: None} and config.is_dynamic:
            return _args(config, "token", True)
    raise ValueError(f"{layer.name}: activations {config.format_name} {config.granularity} with "
                     f"{weights['type']} weights have no compressed-tensors format; expressible are 8-bit "
                     "static per-tensor or dynamic per-token (int8 with int8 weights, fp8 with fp8), NVFP4 with NVFP4")


def compression_format(weights: dict, inputs: dict | None) -> str:
    if weights["strategy"] == "tensor_group":
        return "nvfp4-pack-quantized"
    if weights["type"] == "float":
        return "float-quantized"
    if inputs is not None:
        if weights["num_bits"] != 8 or not weights["symmetric"]:
            raise ValueError(f"int{weights['num_bits']} asymmetric={not weights['symmetric']} weights with quantized "
                             "activations: compressed-tensors' int-quantized takes symmetric INT8 weights")
        return "int-quantized"
    return "pack-quantized"


def layer_scheme(layer: QuantizedLinear) -> dict:
    """{"weights", "input_activations", "output_activations", "format"} of one layer."""
    weights = weight_args(layer)
    inputs = input_args(layer, weights)
    return {"weights": weights, "input_activations": inputs, "output_activations": None,
            "format": compression_format(weights, inputs)}


def _shaped_scale(scale: torch.Tensor, weights: dict, n: int) -> torch.Tensor:
    return scale.reshape(n, -1).contiguous() if weights["strategy"] != "tensor" else scale.reshape(1)


def layer_tensors(layer: QuantizedLinear, scheme: dict) -> dict[str, torch.Tensor]:
    """{suffix: tensor} one layer writes (the module docstring's table)."""
    weights, fmt = scheme["weights"], scheme["format"]
    n, k = layer.weight.shape
    tensors: dict[str, torch.Tensor] = {}
    if weights["strategy"] == "block":
        tensors["weight"], tensors["weight_scale"] = layer.float8_blocks()
    elif fmt == "nvfp4-pack-quantized":
        packed = layer.packed()
        tensors["weight_packed"] = packed.codes
        tensors["weight_scale"] = packed.scale
        tensors["weight_global_scale"] = (1.0 / packed.global_scale.float()).reshape(1)
    else:
        packed = layer.packed()
        codes = packed.element_values() if packed.format.packs_nibbles else packed.codes
        if fmt == "pack-quantized":
            tensors["weight_packed"] = pack_int32(codes.to(torch.int64), weights["num_bits"])
            tensors["weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
        else:
            tensors["weight"] = packed.codes
        tensors["weight_scale"] = _shaped_scale(layer.weight_step(maxbound(layer.config)), weights, n)
    input_amax = layer.input_amax()
    if input_amax is not None:
        if fmt == "nvfp4-pack-quantized":
            tensors["input_global_scale"] = (NVFP4_RANGE / input_amax).reshape(1)
        else:
            tensors["input_scale"] = (input_amax / maxbound(layer.input_quantizer.config)).reshape(1)
    return tensors


def kv_cache_scheme(model: nn.Module) -> tuple[dict | None, dict[str, torch.Tensor]]:
    """(kv_cache_scheme, {'<attn>.k_scale': amax/448, '<attn>.v_scale': ...}) for a static FP8 KV cache."""
    tensors = {}
    for name, (k, v) in kv_cache_quantizers(model).items():
        for quantizer, key in ((k, "k_scale"), (v, "v_scale")):
            config = quantizer.config
            if config.num_bits != (4, 3) or config.block_sizes is not None or config.axis is not None \
                    or quantizer.amax is None:
                raise ValueError(f"{name}.{key[0]}_bmm_quantizer: {config.format_name} {config.granularity}: "
                                 "compressed-tensors stores a static per-tensor FP8 KV cache only")
            tensors[f"{name}.{key}"] = (quantizer.amax.detach().float() / formats.E4M3.max_value).reshape(1)
    if not tensors:
        return None, {}
    return _args(QuantizerAttributeConfig(num_bits=(4, 3)), "tensor", False), tensors


def quantization_config(schemes: dict[str, dict], excluded: list[str], kv_scheme: dict | None) -> dict:
    """config.json's ``quantization_config`` (see the module docstring)."""
    groups: dict[str, tuple[dict, list[str]]] = {}
    for name, scheme in schemes.items():
        key = json.dumps(scheme, sort_keys=True)
        groups.setdefault(key, (scheme, []))[1].append(name)
    single = len(groups) == 1
    config_groups = {}
    for index, (scheme, names) in enumerate(groups.values()):
        config_groups[f"group_{index}"] = {"targets": ["Linear"] if single else names, **scheme}
    return {
        "quant_method": "compressed-tensors",
        "format": next(iter(groups.values()))[0]["format"] if single else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": sorted(excluded),
        "kv_cache_scheme": kv_scheme,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "producer": {"name": "lowbit", "version": __version__},
    }


def build_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors by name, quantization_config); every layer is checked before any tensor is made."""
    layers, excluded = quantized_linears(model)
    if not layers:
        raise ValueError("model has no quantized Linear with an enabled weight quantizer: call lowbit.quantize first")
    schemes = {name: layer_scheme(layer) for name, layer in layers.items()}
    unfoldable = [name for name, layer in layers.items() if layer.pre_quant_scale is not None]
    if unfoldable:
        raise ValueError(f"{unfoldable[0]} (and {len(unfoldable) - 1} more): inputs multiplied by a pre_quant_scale "
                         "(AWQ / SmoothQuant kept per linear), which compressed-tensors cannot store; use a scaling "
                         "that folds into the norms, or export_hf_checkpoint")
    kv_scheme, kv_tensors = kv_cache_scheme(model)
    state = export_state_dict(model, layers, None, lambda name, layer: layer_tensors(layer, schemes[name]))
    state.update(kv_tensors)
    return state, quantization_config(schemes, excluded, kv_scheme)


def export_compressed_tensors(
    model: nn.Module,
    export_dir: str | Path,
    *,
    tokenizer=None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (quantized by ``lowbit.quantize``) as a compressed-tensors checkpoint in ``export_dir``.

    Raises ValueError naming the layer when a format has no compressed-tensors layout, before writing;
    writes atomically (``lowbit.files.atomic_directory``); returns the directory.
    """
    state, config = build_state_dict(model)
    with atomic_directory(export_dir, "export_compressed_tensors", overwrite) as staging:
        save_model_files(model, tokenizer, staging, config)
        save_file({k: v.cpu() for k, v in state.items()}, str(staging / TENSOR_FILE), metadata={"format": "pt"})
    return Path(export_dir)
