"""ModelOpt's unified Hugging Face checkpoint: what TensorRT-LLM, vLLM and SGLang load as ``quant_method: modelopt``.

Tensor names are the original checkpoint's; each quantized linear ``L`` writes, by ``quant_algo``:

| quant_algo                | L.weight                               | L.weight_scale (float32 unless said) |
|---------------------------|----------------------------------------|--------------------------------------|
| FP8                       | float8_e4m3fn (N, K)                   | () = amax / 448                      |
| FP8_PER_CHANNEL_PER_TOKEN | float8_e4m3fn (N, K)                   | (N,) = amax_n / 448                  |
| W8A8_SQ_PER_CHANNEL       | int8 (N, K)                            | (N,) = amax_n / 127                  |
| W8A16                     | int8 (N, K)                            | (N,) = amax_n / 127                  |
| W4A16_AWQ, W4A8_AWQ       | uint8 (N/2, K), see ``unpack_int4_rows`` | (N, K/g) = block amax / 7            |
| NVFP4, W4A16_NVFP4        | uint8 (N, K/2) E2M1, low nibble first  | float8_e4m3fn (N, K/16)              |
| FP8_PB_WO                 | float8_e4m3fn (N, K)                   | (N/128, K/128) = block amax / 448    |
| MXFP8                     | float8_e4m3fn (N, K)                   | uint8 E8M0 (N, K/32)                 |

``L.weight_scale_2`` (): W4A8_AWQ the FP8 stage's amax / 448, NVFP4 the global amax / (6 * 448).
``L.input_scale`` () for static activations: amax / 448 (FP8, W4A8), amax / 127 (W8A8), amax / (6 * 448) (NVFP4);
plus ``L.pre_quant_scale`` (K,) where the input is multiplied before quantization (AWQ, SmoothQuant), and
``<attention>.k_proj.k_scale`` / ``v_proj.v_scale`` () = amax / 448 for a quantized KV cache. Codes are
lowbit's own (``lowbit.compress`` through ``lowbit.formats``), so ``code * weight_scale`` is the
fake-quantized weight to one float32 rounding. ``hf_quant_config.json`` holds ``{"producer", "quantization":
{"quant_algo", "kv_cache_quant_algo", <layer fields>, "exclude_modules"}}``, or with several formats
``quant_algo: MIXED_PRECISION`` and ``quantized_layers: {name: <layer fields>}``; ``config.json`` gets the
same as ``quantization_config`` with ``quant_method: "modelopt"`` (ModelOpt 0.47's layout, read from its
``modelopt/torch/export``; vLLM's ``quantization/modelopt.py`` is the loader).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lowbit import formats
from lowbit.attributes import QuantizerAttributeConfig
from lowbit.compress.packing import pack_uint4, unpack_uint4
from lowbit.export.layers import QuantizedLinear, export_state_dict, kv_cache_quantizers, quantized_linears
from lowbit.export.model_files import save_model_files
from lowbit.files import atomic_directory
from lowbit.version import __version__

QUANT_CONFIG_FILE = "hf_quant_config.json"
TENSOR_FILE = "model.safetensors"
PRODUCER = "lowbit"
KV_CACHE_MAXBOUND = 448.0  # ModelOpt writes k/v scales as amax / 448 for FP8 and NVFP4 caches
KV_CACHE_ALGOS = {(4, 3): "FP8", 8: "INT8", (2, 1): "NVFP4"}
QUANT_ALGOS = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO", "W8A8_SQ_PER_CHANNEL", "W8A16", "W4A16_AWQ",
               "W4A8_AWQ",
               "NVFP4", "W4A16_NVFP4", "MXFP8")


def maxbound(config: QuantizerAttributeConfig) -> float:
    """The largest code magnitude of a format: qmax for integers, the largest finite value for floats."""
    if config.is_float:
        return formats.float_format(config.num_bits).max_value
    return float(formats.int_range(config.num_bits, config.unsigned, config.narrow_range)[1])


def _is_signed_int(config: QuantizerAttributeConfig, bits: int) -> bool:
    return config.num_bits == bits and not (config.asymmetric or config.unsigned or config.narrow_range)


def _is_per_tensor(config: QuantizerAttributeConfig) -> bool:
    return config.axis is None and config.block_sizes is None


def _is_per_token(config: QuantizerAttributeConfig) -> bool:
    return config.block_axes == {-1: None} and config.is_dynamic


def _k_blocks(config: QuantizerAttributeConfig) -> int | None:
    """The block size along the input dim when that is the config's only block axis, else None."""
    blocks = config.block_axes
    return next(iter(blocks.values())) if len(blocks) == 1 and next(iter(blocks)) in (-1, 1) else None


def _weight_algo(layer: QuantizedLinear) -> str | None:
    """The quant_algo the weight stages alone determine (None: no unified format)."""
    first = layer.config
    if len(layer.stages) == 2:
        second = layer.stages[1].config
        if _is_signed_int(first, 4) and _k_blocks(first) and second.num_bits == (4, 3) and _is_per_tensor(second):
            return "W4A8_AWQ"
        return None
    if first.block_scale_bits == (4, 3):
        return "NVFP4"
    if first.block_scale_bits == (8, 0):
        return "MXFP8" if first.num_bits == (4, 3) else None
    if _is_signed_int(first, 4) and _k_blocks(first):
        return "W4A16_AWQ"
    if _is_signed_int(first, 8) and first.axis in (0, -2):
        return "W8A8_SQ_PER_CHANNEL"
    if first.num_bits == (4, 3) and _is_per_tensor(first):
        return "FP8"
    if first.num_bits == (4, 3) and layer.block_dims() is not None:
        return "FP8_PB_WO"
    if first.num_bits == (4, 3) and first.axis in (0, -2):
        return "FP8_PER_CHANNEL_PER_TOKEN"
    return None


def _input_fits(algo: str, config: QuantizerAttributeConfig | None) -> str | None:
    """The final quant_algo given the input quantizer's config (None: the pair has no unified format)."""
    if config is None:
        weight_only = {"W8A8_SQ_PER_CHANNEL": "W8A16", "NVFP4": "W4A16_NVFP4", "W4A8_AWQ": None}
        return weight_only.get(algo, algo)
    static_fp8 = config.num_bits == (4, 3) and _is_per_tensor(config) and not config.is_dynamic
    accepted = {
        "FP8": static_fp8,
        "W4A8_AWQ": static_fp8,
        "FP8_PER_CHANNEL_PER_TOKEN": config.num_bits == (4, 3) and _is_per_token(config),
        "W8A8_SQ_PER_CHANNEL": _is_signed_int(config, 8) and _is_per_tensor(config) and not config.is_dynamic,
        "NVFP4": config.block_scale_bits == (4, 3),
        "MXFP8": config.block_scale_bits == (8, 0) and config.num_bits == (4, 3),
    }  # FP8_PB_WO, W4A16_AWQ: weight-only
    return algo if accepted.get(algo, False) else None


def quant_algo(layer: QuantizedLinear) -> str:
    """ModelOpt's quant_algo for one quantized linear; ValueError naming the layer and its formats if none fits."""
    weight_algo = _weight_algo(layer)
    input_config = None if layer.input_quantizer is None else layer.input_quantizer.config
    algo = None if weight_algo is None else _input_fits(weight_algo, input_config)
    if algo is None:
        weights = " then ".join(f"{s.config.format_name} {s.config.granularity}" for s in layer.stages)
        inputs = "none" if input_config is None else f"{input_config.format_name} {input_config.granularity}"
        raise ValueError(
            f"{layer.name}: weights {weights} with activations {inputs} have no ModelOpt unified checkpoint "
            f"format; expressible are {list(QUANT_ALGOS)} (e.g. lowbit presets FP8_DEFAULT, "
            "FP8_PER_CHANNEL_PER_TOKEN, INT4_AWQ, W4A8_AWQ_BETA, INT8_SMOOTHQUANT, INT8_WEIGHT_ONLY, NVFP4_DEFAULT, "
            "W4A16_NVFP4, MXFP8_DEFAULT)")
    return algo


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """ModelOpt's W4A16_AWQ / W4A8_AWQ layout, uint8 (N/2, K) with byte (i, k) = (c[2i, k] & 15) | (c[2i+1, k] << 4)
    (nibbles paired along the output dim, two's complement) -> int8 codes (N, K) in -8..7."""
    low = (packed & 0xF).to(torch.int16)
    high = (packed >> 4).to(torch.int16)
    signed = torch.stack((low, high), dim=1).flatten(0, 1)
    return torch.where(signed > 7, signed - 16, signed).to(torch.int8)


def rows_from_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    """lowbit's INT4 storage -> ModelOpt's (the layout of ``unpack_int4_rows``), in bytes.

    lowbit's: uint8 (N, K/2), offset-binary nibbles ``c + 8`` paired along K, low first (``compress.pack_uint4``);
    ModelOpt's: uint8 (N/2, K), two's complement nibbles paired along N. ``c + 8`` and ``c``'s two's complement
    nibble differ in the top bit alone (``x ^ 8``), so the conversion stays in bytes."""
    codes = unpack_uint4(nibbles) ^ 8
    if codes.shape[0] % 2:
        raise ValueError(f"INT4 rows are packed in pairs: out_features {codes.shape[0]} must be even")
    return codes[0::2] | (codes[1::2] << 4)


def nibbles_from_rows(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``rows_from_nibbles``: ModelOpt's uint8 (N/2, K) -> lowbit's uint8 (N, K/2)."""
    rows = torch.stack(((packed & 15) ^ 8, (packed >> 4) ^ 8), dim=1).flatten(0, 1)
    return pack_uint4(rows)


def _scale(amax: torch.Tensor, config: QuantizerAttributeConfig, shape: tuple[int, ...]) -> torch.Tensor:
    return formats.divisor_step(amax, maxbound(config)).reshape(shape).contiguous()


def _weight_scale(layer: QuantizedLinear, shape: tuple[int, ...]) -> torch.Tensor:
    return layer.weight_step(maxbound(layer.config)).reshape(shape).contiguous()


def layer_tensors(layer: QuantizedLinear, algo: str) -> dict[str, torch.Tensor]:
    """{suffix: tensor} one quantized linear writes (the module docstring's table)."""
    n, k = layer.weight.shape
    packed = None if algo == "FP8_PB_WO" else layer.packed()
    tensors: dict[str, torch.Tensor] = {}
    if algo in ("W4A16_AWQ", "W4A8_AWQ"):
        tensors["weight"] = rows_from_nibbles(packed.codes)
        tensors["weight_scale"] = _weight_scale(layer, (n, k // packed.format.block_size))
        if algo == "W4A8_AWQ":
            tensors["weight_scale_2"] = _scale(layer.weight_amax(1), layer.stages[1].config, ())
    elif algo in ("NVFP4", "W4A16_NVFP4"):
        tensors["weight"] = packed.codes
        tensors["weight_scale"] = packed.scale
        tensors["weight_scale_2"] = packed.global_scale.float().reshape(())
    elif algo == "FP8_PB_WO":
        tensors["weight"], tensors["weight_scale"] = layer.float8_blocks()
    elif algo == "MXFP8":
        tensors["weight"] = packed.codes
        tensors["weight_scale"] = packed.scale
    else:
        tensors["weight"] = packed.codes
        tensors["weight_scale"] = _weight_scale(layer, () if algo == "FP8" else (n,))
    input_amax = layer.input_amax()
    if input_amax is not None:
        input_config = layer.input_quantizer.config
        bound = maxbound(input_config) * (formats.E4M3.max_value if input_config.block_scale_bits == (4, 3) else 1)
        tensors["input_scale"] = (input_amax / bound).reshape(()).contiguous()
    if layer.pre_quant_scale is not None:
        tensors["pre_quant_scale"] = layer.pre_quant_scale.contiguous()
    return tensors


def layer_config(layer: QuantizedLinear, algo: str) -> dict:
    """The per-layer fields of ``hf_quant_config.json`` (ModelOpt's process_layer_quant_config)."""
    fields: dict = {"quant_algo": algo}
    if algo in ("W4A16_AWQ", "W4A8_AWQ"):
        fields.update(group_size=_k_blocks(layer.config), has_zero_point=False, pre_quant_scale=True)
    elif algo in ("NVFP4", "W4A16_NVFP4", "MXFP8"):
        fields["group_size"] = _k_blocks(layer.config)
    elif algo == "FP8_PB_WO":
        fields["group_size"] = layer.block_dims()[1]
    return fields


def kv_cache_algo(config: QuantizerAttributeConfig) -> str | None:
    """ModelOpt's kv_cache_quant_algo for a k/v quantizer: static per-tensor FP8 / INT8, or NVFP4 (E2M1 blocks of
    16 along head_dim with E4M3 block scales; the per-tensor amax is what the export keeps); None if neither."""
    if config.block_scale_bits == (4, 3) and config.num_bits == (2, 1) and _k_blocks(config) == 16:
        return "NVFP4"
    return KV_CACHE_ALGOS.get(config.num_bits) if _is_per_tensor(config) and config.num_bits != (2, 1) else None


def kv_cache_tensors(model: nn.Module) -> tuple[str | None, dict[str, torch.Tensor]]:
    """(kv_cache_quant_algo, {'<attn>.k_proj.k_scale': amax/448, ...}); ValueError if formats are mixed."""
    algos, tensors = set(), {}
    for name, (k, v) in kv_cache_quantizers(model).items():
        for quantizer, key in ((k, "k_proj.k_scale"), (v, "v_proj.v_scale")):
            algo = kv_cache_algo(quantizer.config)
            if algo is None or quantizer.amax is None or quantizer.amax.numel() != 1:
                raise ValueError(f"{name}: KV cache quantizer {quantizer.config.format_name} "
                                 f"{quantizer.config.granularity} (calibrated: {quantizer.amax is not None}) has "
                                 f"no ModelOpt format; allowed are static per-tensor {sorted(KV_CACHE_ALGOS.values())} "
                                 "or NVFP4 blocks of 16 under a calibrated per-tensor amax")
            algos.add(algo)
            tensors[f"{name}.{key}"] = (quantizer.amax.detach().float() / KV_CACHE_MAXBOUND).reshape(())
    if len(algos) > 1:
        raise ValueError(f"KV cache quantized in several formats {sorted(algos)}: ModelOpt takes one")
    return (algos.pop() if algos else None), tensors


def hf_quant_config(layer_configs: dict[str, dict], excluded: list[str], kv_algo: str | None) -> dict:
    """``hf_quant_config.json``: one format at the top level, several as MIXED_PRECISION per layer."""
    quantization: dict = {"quant_algo": None, "kv_cache_quant_algo": kv_algo}
    distinct = {json.dumps(c, sort_keys=True) for c in layer_configs.values()}
    if len(distinct) > 1:
        quantization["quant_algo"] = "MIXED_PRECISION"
        quantization["quantized_layers"] = layer_configs
    elif distinct:
        quantization.update(next(iter(layer_configs.values())))
        quantization["exclude_modules"] = sorted(excluded)
    return {"producer": {"name": PRODUCER, "version": __version__}, "quantization": quantization}


FLOAT8_ARGS = {"dynamic": False, "num_bits": 8, "type": "float"}


def group_config(layer_fields: dict) -> dict | None:
    """A compressed-tensors style ``config_groups`` entry describing one layer format (ModelOpt writes one for
    FP8, NVFP4 and W4A16_NVFP4 checkpoints and for every format of a MIXED_PRECISION one), None for others."""
    algo, size = layer_fields["quant_algo"], layer_fields.get("group_size")
    fp4 = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": size}
    groups = {
        "FP8": {"input_activations": FLOAT8_ARGS, "weights": FLOAT8_ARGS},
        "FP8_PER_CHANNEL_PER_TOKEN": {"input_activations": FLOAT8_ARGS,
                                      "weights": {**FLOAT8_ARGS, "strategy": "channel"}},
        "NVFP4": {"input_activations": fp4, "weights": fp4},
        "W4A16_NVFP4": {"weights": fp4},
        "W4A16_AWQ": {"weights": {"dynamic": False, "num_bits": 4, "type": "int", "group_size": size}},
    }
    return groups.get(algo)


def config_json_quantization(quant_config: dict) -> dict:
    """``quantization_config`` for config.json: the quantization fields, ``config_groups`` (where ModelOpt writes
    them), ``ignore`` for the excluded modules, ``kv_cache_scheme`` and ``quant_method: "modelopt"`` (what
    transformers and vLLM dispatch on)."""
    details = quant_config["quantization"]
    out: dict = {}
    if details["quant_algo"] == "MIXED_PRECISION":
        by_format: dict[str, tuple[dict, list[str]]] = {}
        for name, fields in details["quantized_layers"].items():
            by_format.setdefault(json.dumps(fields, sort_keys=True), (fields, []))[1].append(name)
        out["config_groups"] = {f"group_{i}": {**(group_config(fields) or {}), "targets": sorted(names)}
                                for i, (fields, names) in enumerate(by_format.values())}
        out["quantized_layers"] = details["quantized_layers"]
    elif details["quant_algo"] in ("FP8", "NVFP4", "W4A16_NVFP4"):
        out["config_groups"] = {"group_0": {**group_config(details), "targets": ["Linear"]}}
    out["ignore"] = details.get("exclude_modules", [])
    out["quant_algo"] = details["quant_algo"]
    if details.get("kv_cache_quant_algo") == "FP8":
        out["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
    elif details.get("kv_cache_quant_algo"):
        out["kv_cache_scheme"] = details["kv_cache_quant_algo"]
    out["producer"] = quant_config["producer"]
    out["quant_method"] = "modelopt"
    return out


def build_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors by name, hf_quant_config) of ``model``; every layer is checked before any tensor is made."""
    layers, excluded = quantized_linears(model)
    if not layers:
        raise ValueError("model has no quantized Linear with an enabled weight quantizer: call lowbit.quantize first")
    algos = {name: quant_algo(layer) for name, layer in layers.items()}
    for name, layer in layers.items():
        if algos[name] != "FP8_PB_WO":  # 2-D blocks are written by float8_blocks, not lowbit.compress
            layer.weight_format()
    kv_algo, kv_tensors = kv_cache_tensors(model)
    state = export_state_dict(model, layers, dtype, lambda name, layer: layer_tensors(layer, algos[name]))
    state.update(kv_tensors)
    configs = {name: layer_config(layer, algos[name]) for name, layer in layers.items()}
    return state, hf_quant_config(configs, excluded, kv_algo)


def write_checkpoint(model: nn.Module, directory: Path, tokenizer, state: dict[str, torch.Tensor],
                     quant_config: dict, quantization_config: dict) -> None:
    """The files of an export: config.json (+ quantization_config), tokenizer, hf_quant_config.json, tensors."""
    save_model_files(model, tokenizer, directory, quantization_config)
    (directory / QUANT_CONFIG_FILE).write_text(json.dumps(quant_config, indent=2) + "\n")
    save_file({k: v.cpu() for k, v in state.items()}, str(directory / TENSOR_FILE), metadata={"format": "pt"})


def export_hf_checkpoint(
    model: nn.Module,
    export_dir: str | Path,
    *,
    tokenizer=None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``model`` (quantized by ``lowbit.quantize``) as ModelOpt's unified HF checkpoint in ``export_dir``.

    ``dtype`` casts the unquantized tensors (default: as in the model); scales stay float32, codes in their
    storage dtype. Raises ValueError naming the layer when a format has no unified layout, before writing.
    The directory is written atomically (``lowbit.files.atomic_directory``); returns it.
    """
    state, quant_config = build_state_dict(model, dtype)
    with atomic_directory(export_dir, "export_hf_checkpoint", overwrite) as staging:
        write_checkpoint(model, staging, tokenizer, state, quant_config, config_json_quantization(quant_config))
    return Path(export_dir)

