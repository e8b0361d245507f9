"""load_quantized(export_dir): a runnable lowbit model from lowbit's ModelOpt-HF or compressed-tensors export.

The architecture comes from ``config.json`` (``AutoModelForCausalLM.from_config``), the unquantized tensors
are loaded as they are, and every quantized linear becomes a ``CompressedLinear`` over the exported codes:

- scales are converted back to lowbit's multiplicative form, ``scale = 1 / weight_scale`` (and NVFP4's
  ``global_scale = weight_scale_2``, or ``1 / weight_global_scale`` in compressed-tensors), so the weights
  equal the exporting model's to the rounding of one float32 reciprocal;
- static activation scales become the input quantizer's ``amax = input_scale * maxbound``, per-token
  dynamic activations a dynamic per-token quantizer, ``pre_quant_scale`` the input quantizer's;
- layouts with no CompressedLinear storage (128x128-block FP8, W4A8's two weight stages) are loaded as a
  lowbit quantized Linear holding the dequantized weight (``code * weight_scale``; W4A8 then rounded to the
  FP8 stage as ``round(y / weight_scale_2) * weight_scale_2``, the exporting model's own arithmetic:
  ``lowbit.formats.steps``) with the export's input quantizer, and said so in a warning.

A quantized KV cache (k/v scales, FP8 or NVFP4) becomes the attention modules' k/v quantizers (``kv_cache``).
Fused MoE experts, exported per expert, are stacked back into compressed experts (``load_experts``).
"""

from __future__ import annotations

import fnmatch
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from lowbit import formats
from lowbit.compress.linear import CompressedLinear
from lowbit.compress.packed import PackedWeight, WeightFormat
from lowbit.compress.packing import pack_uint4
from lowbit.export.compressed_tensors import NVFP4_RANGE, unpack_int32
from lowbit.export.kv_cache import pop_kv_scales, restore_kv_cache
from lowbit.export.load_experts import expert_layer_names, load_experts, module_key
from lowbit.export.modelopt_hf import nibbles_from_rows, unpack_int4_rows
from lowbit.modules.registry import convert_module
from lowbit.quantizer import TensorQuantizer

logger = logging.getLogger(__name__)
FP8 = (4, 3)
PER_TOKEN = {-1: None, "type": "dynamic"}
NVFP4_BLOCKS = {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}


def _quantizer(config: dict | None, amax: torch.Tensor | None = None,
               pre_quant_scale: torch.Tensor | None = None) -> TensorQuantizer:
    """A TensorQuantizer of ``config`` (None: disabled) with a static ``amax`` and a pre_quant_scale."""
    quantizer = TensorQuantizer(config)
    if config is None:
        quantizer.disable()
    if amax is not None:
        quantizer.set_amax(amax.float().reshape(()))
    if pre_quant_scale is not None:
        quantizer.pre_quant_scale = pre_quant_scale.float()
    return quantizer


def _int_codes_storage(codes: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Signed integer codes (N, K) in lowbit's storage: offset-binary nibbles for <= 4 bits, else int8."""
    if num_bits <= 4:
        return pack_uint4((codes.to(torch.int16) + (1 << (num_bits - 1))).to(torch.uint8))
    return codes.to(torch.int8)


def _reciprocal(divisor: torch.Tensor) -> torch.Tensor:
    return (1.0 / divisor.float()).contiguous()


def _modelopt_weight(algo: str, t: dict[str, torch.Tensor], shape: tuple[int, int], group_size: int | None):
    """(PackedWeight or None, dense dequantized weight or None) of one ModelOpt-exported layer."""
    n, k = shape
    scale = t["weight_scale"]
    if algo in ("FP8", "FP8_PER_CHANNEL_PER_TOKEN"):
        per_channel = algo != "FP8"
        return PackedWeight(WeightFormat("float", FP8, per_channel=per_channel), shape, t["weight"],
                            _reciprocal(scale).reshape(-1, 1)), None
    if algo in ("W8A8_SQ_PER_CHANNEL", "W8A16"):
        return PackedWeight(WeightFormat("int", 8, per_channel=True), shape, t["weight"],
                            _reciprocal(scale).reshape(n, 1)), None
    if algo == "W4A16_AWQ":
        return PackedWeight(WeightFormat("int", 4, block_size=group_size), shape, nibbles_from_rows(t["weight"]),
                            _reciprocal(scale)), None
    if algo in ("NVFP4", "W4A16_NVFP4"):
        return PackedWeight(WeightFormat("nvfp4", (2, 1), block_size=16), shape, t["weight"], scale,
                            global_scale=t["weight_scale_2"].float().reshape(())), None
    if algo == "MXFP8":
        return PackedWeight(WeightFormat("mx", FP8, block_size=32), shape, t["weight"], scale), None
    if algo == "W4A8_AWQ":
        blocks = formats.to_blocks(unpack_int4_rows(t["weight"]).float(), group_size)
        int4 = (blocks * scale.float().unsqueeze(-1)).reshape(shape)
        return None, formats.fake_quant_by_step(int4, t["weight_scale_2"].float(), formats.E4M3)
    if algo == "FP8_PB_WO":
        return None, _dense_blocks(t["weight"], scale)
    raise ValueError(f"quant_algo {algo!r}: load_quantized reads lowbit's exports only")


def _dense_blocks(codes: torch.Tensor, divisor: torch.Tensor) -> torch.Tensor:
    """``code * divisor`` per 2-D block (divisor (N/r, K/c))."""
    n, k = codes.shape
    rows, columns = n // divisor.shape[0], k // divisor.shape[1]
    view = codes.float().reshape(divisor.shape[0], rows, divisor.shape[1], columns)
    return (view * divisor.float()[:, None, :, None]).reshape(n, k)


def _modelopt_input(algo: str, t: dict[str, torch.Tensor]) -> TensorQuantizer:
    scale, pre_quant_scale = t.get("input_scale"), t.get("pre_quant_scale")
    if algo in ("FP8", "W4A8_AWQ") and scale is not None:  # FP8 without input_scale: weight-only
        return _quantizer({"num_bits": FP8}, scale * formats.E4M3.max_value, pre_quant_scale)
    if algo == "FP8_PER_CHANNEL_PER_TOKEN":
        return _quantizer({"num_bits": FP8, "block_sizes": PER_TOKEN}, None, pre_quant_scale)
    if algo == "W8A8_SQ_PER_CHANNEL":
        return _quantizer({"num_bits": 8}, scale * 127.0, pre_quant_scale)
    if algo == "NVFP4":
        return _quantizer({"num_bits": (2, 1), "block_sizes": NVFP4_BLOCKS}, scale * NVFP4_RANGE, pre_quant_scale)
    if algo == "MXFP8":
        return _quantizer({"num_bits": FP8, "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": (8, 0)}},
                          None, pre_quant_scale)
    return _quantizer(None, None, pre_quant_scale)


def _modelopt_layers(directory: Path, linear_names: list[str]) -> dict[str, dict]:
    """{layer name: its hf_quant_config fields} from hf_quant_config.json."""
    details = json.loads((directory / "hf_quant_config.json").read_text())["quantization"]
    if details["quant_algo"] == "MIXED_PRECISION":
        return details["quantized_layers"]
    excluded = details.get("exclude_modules", [])
    return {name: details for name in linear_names if not any(fnmatch.fnmatch(name, p) for p in excluded)}


def _kv_cache_algo(directory: Path, method: str, quant_config: dict) -> str | None:
    """The export's KV-cache format: ModelOpt's kv_cache_quant_algo, or FP8 for compressed-tensors' 8-bit float
    kv_cache_scheme; ValueError for any other scheme."""
    if method == "modelopt":
        return json.loads((directory / "hf_quant_config.json").read_text())["quantization"].get("kv_cache_quant_algo")
    scheme = quant_config.get("kv_cache_scheme")
    if not scheme:
        return None
    if scheme.get("num_bits") == 8 and scheme.get("type") == "float" and scheme.get("strategy", "tensor") == "tensor":
        return "FP8"
    raise ValueError(f"{directory}: kv_cache_scheme {scheme} is not a static per-tensor FP8 cache, the one "
                     "compressed-tensors KV format lowbit loads")


def _ct_layers(config: dict, linear_names: list[str]) -> dict[str, dict]:
    """{layer name: its compressed-tensors scheme} from config_groups (targets "Linear" or layer names)."""
    ignore = config.get("ignore", [])
    layers = {}
    for group in config["config_groups"].values():
        for name in linear_names:
            if name in ignore:
                continue
            if "Linear" in group["targets"] or name in group["targets"]:
                layers[name] = group
    return layers


def _ct_weight(scheme: dict, t: dict[str, torch.Tensor], shape: tuple[int, int]):
    """(PackedWeight or None, dense weight or None) of one compressed-tensors layer."""
    weights, fmt = scheme["weights"], scheme["format"]
    n, k = shape
    if fmt == "nvfp4-pack-quantized":
        return PackedWeight(WeightFormat("nvfp4", (2, 1), block_size=16), shape, t["weight_packed"], t["weight_scale"],
                            global_scale=(1.0 / t["weight_global_scale"].float()).reshape(())), None
    if weights["strategy"] == "block":
        return None, _dense_blocks(t["weight"], t["weight_scale"])
    block = weights["group_size"] if weights["strategy"] == "group" else None
    per_channel = weights["strategy"] == "channel"
    scale = _reciprocal(t["weight_scale"]).reshape(n, -1) if block or per_channel else \
        _reciprocal(t["weight_scale"]).reshape(1, 1)
    bits = weights["num_bits"]
    if fmt == "float-quantized":
        return PackedWeight(WeightFormat("float", FP8, per_channel=per_channel), shape, t["weight"], scale), None
    codes = unpack_int32(t["weight_packed"], bits, k) if fmt == "pack-quantized" else t["weight"]
    return PackedWeight(WeightFormat("int", bits, block_size=block, per_channel=per_channel), shape,
                        _int_codes_storage(codes, bits), scale), None


def _ct_input(scheme: dict, t: dict[str, torch.Tensor]) -> TensorQuantizer:
    args = scheme.get("input_activations")
    if args is None:
        return _quantizer(None)
    if args["strategy"] == "tensor_group":
        return _quantizer({"num_bits": (2, 1), "block_sizes": NVFP4_BLOCKS}, NVFP4_RANGE / t["input_global_scale"])
    bits = FP8 if args["type"] == "float" else 8
    if args["strategy"] == "token":
        return _quantizer({"num_bits": bits, "block_sizes": PER_TOKEN})
    bound = formats.E4M3.max_value if args["type"] == "float" else 127.0
    return _quantizer({"num_bits": bits}, t["input_scale"] * bound)


def _dense_quantized(linear: nn.Linear, weight: torch.Tensor, input_quantizer: TensorQuantizer) -> None:
    """Make ``linear`` a lowbit quantized Linear (in place) over the dequantized ``weight``: its weight
    quantizer disabled (the weight is already on the grid), its input quantizer the export's."""
    convert_module(linear)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    linear.weight_quantizer.disable()
    linear.input_quantizer = input_quantizer


def _layer_tensors(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    prefix = name + "."
    return {key[len(prefix):]: value for key, value in tensors.items()
            if key.startswith(prefix) and "." not in key[len(prefix):] and key[len(prefix):] != "bias"}


def load_quantized(export_dir: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """The model exported to ``export_dir`` by ``export_hf_checkpoint`` or ``export_compressed_tensors``,
    rebuilt with CompressedLinear layers (see the module docstring), in eval mode on ``device``."""
    from transformers import AutoConfig

    from lowbit.hf import uninitialized_causal_lm

    directory = Path(export_dir)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"export_dir={str(directory)!r} has no config.json: not an export directory")
    quant_config = json.loads(config_path.read_text()).get("quantization_config") or {}
    method = quant_config.get("quant_method")
    if method not in ("modelopt", "compressed-tensors"):
        raise ValueError(f"{config_path}: quantization_config.quant_method={method!r}; load_quantized reads "
                         "'modelopt' and 'compressed-tensors' exports")
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    del config.quantization_config
    model = uninitialized_causal_lm(config, dtype)
    tensors = load_file(str(directory / "model.safetensors"))
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    expert_layers = [layer for experts in expert_layer_names(model).values() for names in experts for layer in names]
    if method == "modelopt":
        layers = _modelopt_layers(directory, linears + expert_layers)
    else:
        layers = _ct_layers(quant_config, linears + expert_layers)
    layers = {name: entry for name, entry in layers.items() if f"{name}.weight_scale" in tensors}
    kv_algo = _kv_cache_algo(directory, method, quant_config)
    if kv_algo is not None:
        restore_kv_cache(model, pop_kv_scales(tensors, method), kv_algo)

    def read_layer(name: str, shape: tuple[int, int]):
        """(PackedWeight or None, dense weight or None, input quantizer) of exported layer ``name``; its
        tensors leave ``tensors``."""
        entry, own = layers[name], _layer_tensors(tensors, name)
        for key in own:
            del tensors[f"{name}.{key}"]
        if method == "modelopt":
            packed, dense = _modelopt_weight(entry["quant_algo"], own, shape, entry.get("group_size"))
            return packed, dense, _modelopt_input(entry["quant_algo"], own)
        packed, dense = _ct_weight(entry, own, shape)
        return packed, dense, _ct_input(entry, own)

    to_module_key = module_key(model)
    rebuilt_experts = load_experts(model, tensors, set(layers), read_layer)
    dense_layers = []
    for name in [name for name in layers if name not in set(expert_layers)]:
        original = model.get_submodule(name)
        packed, dense, input_quantizer = read_layer(name, (original.out_features, original.in_features))
        if packed is None:
            _dense_quantized(original, dense.to(dtype), input_quantizer)
            dense_layers.append(name)
            continue
        bias = original.bias
        disabled = _quantizer(None)
        model.set_submodule(name, CompressedLinear.from_packed(packed, bias, input_quantizer, disabled))
    if dense_layers:
        logger.warning("load_quantized: %d layer(s) kept as dense dequantized weights (no CompressedLinear "
                       "storage for their format), e.g. %s", len(dense_layers), dense_layers[0])
    tensors = {to_module_key(key): value for key, value in tensors.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    rebuilt = tuple(f"{name}.weight" for name in layers) + tuple(f"{name}." for name in rebuilt_experts)
    state = model.state_dict()
    loaded = {state[key].data_ptr() for key in tensors if key in state}
    missing = [key for key in missing if not key.startswith(rebuilt) and "_quantizer." not in key
               and state[key].data_ptr() not in loaded]  # a tied tensor is written once, under its first name
    if missing or unexpected:
        raise ValueError(f"{directory}: tensors missing {missing[:5]} / unexpected {unexpected[:5]}")
    return model.to(device).eval()
