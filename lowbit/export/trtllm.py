"""TensorRT-LLM's legacy checkpoint: ``config.json`` plus ``rank{i}.safetensors`` per GPU rank.

Layout (TensorRT-LLM ``docs/source/architecture/checkpoint.md``; names and quantization fields as ModelOpt's
``export_tensorrt_llm_checkpoint`` writes them), for a Hugging Face Llama:

| Hugging Face                      | TensorRT-LLM                               | tensor parallel            |
|-----------------------------------|--------------------------------------------|----------------------------|
| model.embed_tokens                | transformer.vocab_embedding                | rows (vocab), zero-padded  |
| layers.N.input_layernorm          | transformer.layers.N.input_layernorm       | replicated                 |
| layers.N.self_attn.{q,k,v}_proj   | transformer.layers.N.attention.qkv         | column: [q_r; k_r; v_r]    |
| layers.N.self_attn.o_proj         | transformer.layers.N.attention.dense       | row (input dim)            |
| layers.N.post_attention_layernorm | transformer.layers.N.post_layernorm        | replicated                 |
| layers.N.mlp.gate_proj            | transformer.layers.N.mlp.fc                | column (output rows)       |
| layers.N.mlp.up_proj              | transformer.layers.N.mlp.gate              | column                     |
| layers.N.mlp.down_proj            | transformer.layers.N.mlp.proj              | row                        |
| model.norm / lm_head              | transformer.ln_f / lm_head                 | replicated / rows, padded  |

Quantized linears (one algorithm for the whole model, from each layer's lowbit config):

| lowbit config                    | quant_algo          | weight                      | scaling factors               |
|----------------------------------|---------------------|-----------------------------|-------------------------------|
| FP8 W per tensor, A per tensor   | FP8                 | float8_e4m3fn (N, K)        | weights_, activation_ () f32  |
| INT8 W per channel, A per tensor | W8A8_SQ_PER_CHANNEL | int8 (N, K)                 | weights_ (N,), activation_ () |
| INT8 W per channel, no A         | W8A16               | int8 (N, K)                 | weights_ (N,)                 |
| INT4 W blocks of g, no A         | W4A16_AWQ           | int8 (N / 2, K): row 2i low | weights_ (N, K / g) ``dtype`` |
|                                  |                     | nibble, row 2i + 1 high     |                               |

A scaling factor is the step: weight = codes * weights_scaling_factor; an input is quantized as
x / activation_scaling_factor (amax / 448 or amax / 127). An input pre_quant_scale (AWQ, SmoothQuant) is
``prequant_scaling_factor`` (K,); a static FP8 KV cache is ``attention.kv_cache_scaling_factor`` =
max(k amax, v amax) / 448. TensorRT-LLM fuses q, k and v, so they share what is per tensor: their input
scale and pre_quant_scale must agree (else an error), and with per-tensor FP8 weights the three are
re-quantized with the largest of their amaxes, as ModelOpt does (the only place the written codes differ
from lowbit's fake-quantized ones).

Splitting: rank ``r = pp_rank * tp + tp_rank``. Column-parallel tensors keep rows ``[r n/tp, (r+1) n/tp)``
of their output dim (qkv: of each of q, k and v, then concatenated), row-parallel ones that slice of
their input dim (and of their prequant_scaling_factor); the embedding and lm_head are zero-padded to a
multiple of tp rows first; everything else is replicated. Pipeline stage p holds layers
``[p L/pp, (p+1) L/pp)`` renumbered from 0, the embedding on the first stage, ln_f and lm_head on the last.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowbit.compress.packed import quantize_weight
from lowbit.export.model_files import save_tokenizer
from lowbit.export.weights import QuantizedWeight, active_activation_quantizers, quantized_weight, weight_quantizer
from lowbit.files import atomic_directory
from lowbit.version import __version__

DECODERS = {"llama": "LlamaForCausalLM"}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
FP8_MAX, INT8_MAX = 448.0, 127.0
QKV = ("q_proj", "k_proj", "v_proj")
LAYER_LINEARS = {  # HF module in a decoder layer -> (TensorRT-LLM module, column parallel?)
    "self_attn.o_proj": ("attention.dense", False),
    "mlp.gate_proj": ("mlp.fc", True),
    "mlp.up_proj": ("mlp.gate", True),
    "mlp.down_proj": ("mlp.proj", False),
}
LAYER_NORMS = {"input_layernorm": "input_layernorm", "post_attention_layernorm": "post_layernorm"}


@dataclass(frozen=True)
class Entry:
    """One tensor of the unsplit checkpoint: ``parts`` (q, k, v for qkv; else one) split along ``axis``
    (None: replicated); ``pad`` zero-pads rows to a multiple of tp first; ``layer`` is the decoder layer
    (None for the embedding, ``stage`` "first", or ln_f / lm_head, ``stage`` "last")."""

    name: str
    parts: tuple[torch.Tensor, ...]
    axis: int | None = None
    layer: int | None = None
    stage: str | None = None
    pad: bool = False


def _static_amax(quantizer, name: str, attribute: str) -> torch.Tensor:
    if quantizer.config.is_dynamic or quantizer.amax is None or quantizer.amax.numel() != 1:
        raise ValueError(f"layer {name!r}: {attribute} is {quantizer.config.granularity} without a calibrated "
                         "per-tensor amax; TensorRT-LLM takes a static per-tensor activation scale")
    return quantizer.amax.detach().float().reshape(())


def linear_algorithm(name: str, module: nn.Module) -> str | None:
    """The quant_algo of one linear (table in the module docstring), None when unquantized; ValueError
    naming the layer and its formats when TensorRT-LLM has no algorithm for them."""
    weights = weight_quantizer(name, module)
    inputs = {attribute: q for attribute, q in active_activation_quantizers(module)}
    if "output_quantizer" in inputs:
        raise ValueError(f"layer {name!r}: output quantization has no TensorRT-LLM checkpoint field")
    if weights is None:
        if inputs:
            raise ValueError(f"layer {name!r}: input quantization on an unquantized weight has no quant_algo")
        return None
    config = weights.config
    activation = inputs.get("input_quantizer")
    a_format = activation.config.format_name if activation is not None and activation.is_enabled else None
    per_channel = config.axis in (0, (0,)) and config.block_sizes is None
    per_tensor = config.axis is None and config.block_sizes is None
    blocks = config.block_axes if config.block_sizes is not None else {}
    if config.format_name == "e4m3" and per_tensor and a_format == "e4m3":
        return "FP8"
    if config.format_name == "int8" and per_channel and a_format == "int8":
        return "W8A8_SQ_PER_CHANNEL"
    if config.format_name == "int8" and per_channel and a_format is None:
        return "W8A16"
    if config.format_name == "int4" and list(blocks) in ([-1], [1]) and a_format is None:
        return "W4A16_AWQ"
    raise ValueError(
        f"layer {name!r}: weight {config.format_name} {config.granularity} with input {a_format or 'unquantized'} "
        "has no TensorRT-LLM legacy quant_algo here; allowed: FP8 (e4m3 per tensor, both), W8A8_SQ_PER_CHANNEL "
        "(int8 per channel + int8 input), W8A16 (int8 per channel), W4A16_AWQ (int4 blocks along the input dim)")


def _int4_pairs(codes: torch.Tensor) -> torch.Tensor:
    """Signed int4 codes (N, K), N even -> int8 (N / 2, K): row 2i in the low nibble, row 2i + 1 high."""
    nibbles = codes.to(torch.int16) & 0x0F
    return (nibbles[0::2] | (nibbles[1::2] << 4)).to(torch.uint8).view(torch.int8)


def _linear_tensors(name: str, weight: QuantizedWeight | torch.Tensor, algorithm: str | None, dtype: torch.dtype,
                    module: nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one linear, unsplit, by field name."""
    if algorithm is None:
        return {"weight": weight.to(dtype)}
    codes = weight.codes
    if algorithm == "FP8":
        tensors = {"weight": codes.to(torch.float8_e4m3fn), "weights_scaling_factor": weight.step.reshape(-1)[0]}
    elif algorithm == "W4A16_AWQ":
        tensors = {"weight": _int4_pairs(codes), "weights_scaling_factor": weight.step.to(dtype)}
    else:
        tensors = {"weight": codes.to(torch.int8), "weights_scaling_factor": weight.step[:, 0].contiguous()}
    activation = module.input_quantizer
    if activation.is_enabled:
        bound = FP8_MAX if algorithm == "FP8" else INT8_MAX
        tensors["activation_scaling_factor"] = _static_amax(activation, name, "input_quantizer") / bound
    if activation.pre_quant_scale is not None:
        tensors["prequant_scaling_factor"] = activation.pre_quant_scale.detach().to(dtype).reshape(-1)
    return tensors


def _split_axis(field: str, tensor: torch.Tensor, column: bool) -> int | None:
    """Which dim of ``field`` tensor parallelism splits (module docstring), None when replicated."""
    if tensor.dim() == 0:
        return None
    if field == "prequant_scaling_factor":
        return None if column else 0
    if column:
        return 0
    if field == "weights_scaling_factor" and tensor.dim() == 1:  # per output channel of a row layer
        return None
    return 1 if tensor.dim() == 2 else None


def _linear_entries(prefix: str, parts: list[dict[str, torch.Tensor]], column: bool, layer: int | None,
                    stage: str | None = None, pad: bool = False) -> list[Entry]:
    entries = []
    for field, first in parts[0].items():
        tensors = tuple(p[field] for p in parts)
        axis = _split_axis(field, first, column)
        if axis is None and len(tensors) > 1:
            if not all(torch.equal(t, first) for t in tensors):  # shared by the fused q, k, v
                raise ValueError(f"{prefix}: q, k and v have different {field} "
                                 f"({[t.flatten()[:3].tolist() for t in tensors]}); the fused qkv holds one")
            tensors = (first,)
        entries.append(Entry(f"{prefix}.{field}", tensors, axis, layer, stage, pad and field == "weight"))
    return entries


def _qkv_weights(names: list[str], modules: list[nn.Module], algorithm: str | None):
    """q, k and v as QuantizedWeights; per-tensor FP8 ones re-quantized with their largest amax."""
    if algorithm is None:
        return [m.weight.detach() for m in modules]
    if algorithm != "FP8":
        return [quantized_weight(n, m) for n, m in zip(names, modules, strict=True)]
    amaxes = torch.stack([m.weight_quantizer.amax.detach().float().reshape(()) for m in modules])
    shared = amaxes.amax()
    if not torch.all(amaxes == shared):
        warnings.warn(f"{names[0].rpartition('.')[0]}: q, k and v weights re-quantized to FP8 with their largest amax "
                      f"{shared.item():.6g} (amaxes {amaxes.tolist()}): TensorRT-LLM's fused qkv has one weight scale",
                      stacklevel=3)
    out = []
    for name, module in zip(names, modules, strict=True):
        packed = quantize_weight(module.weight.detach(), quantized_weight(name, module).format, amax=shared)
        out.append(QuantizedWeight(name, packed, packed.codes.float(), 1.0 / packed.scale.float(), None))
    return out


def _layer_entries(model: nn.Module, index: int, dtype: torch.dtype, algorithms: dict) -> list[Entry]:
    hf, trt = f"model.layers.{index}", f"transformer.layers.{index}"
    entries = []
    for hf_norm, trt_norm in LAYER_NORMS.items():
        weight = model.get_submodule(f"{hf}.{hf_norm}").weight.detach().to(dtype)
        entries.append(Entry(f"{trt}.{trt_norm}.weight", (weight,), None, index))
    names = [f"{hf}.self_attn.{p}" for p in QKV]
    modules = [model.get_submodule(n) for n in names]
    algorithm = algorithms[names[0]]
    weights = _qkv_weights(names, modules, algorithm)
    parts = [_linear_tensors(n, w, algorithm, dtype, m) for n, w, m in zip(names, weights, modules, strict=True)]
    entries += _linear_entries(f"{trt}.attention.qkv", parts, True, index)
    for hf_linear, (trt_linear, column) in LAYER_LINEARS.items():
        name = f"{hf}.{hf_linear}"
        module = model.get_submodule(name)
        algorithm = algorithms[name]
        weight = module.weight.detach() if algorithm is None else quantized_weight(name, module)
        entries += _linear_entries(f"{trt}.{trt_linear}", [_linear_tensors(name, weight, algorithm, dtype, module)],
                                   column, index)
    kv = _kv_cache_scale(model.get_submodule(f"{hf}.self_attn"), f"{hf}.self_attn")
    if kv is not None:
        entries.append(Entry(f"{trt}.attention.kv_cache_scaling_factor", (kv.reshape(1),), None, index))
    return entries


def _kv_cache_scale(attention: nn.Module, name: str) -> torch.Tensor | None:
    quantizers = [getattr(attention, f"{x}_bmm_quantizer", None) for x in ("k", "v")]
    enabled = [q for q in quantizers if q is not None and q.is_enabled]
    if not enabled:
        return None
    if len(enabled) != 2 or any(q.config.format_name != "e4m3" for q in enabled):
        raise ValueError(f"layer {name!r}: the KV cache must be FP8 (e4m3) for k and v both to export to "
                         "TensorRT-LLM (kv_cache_quant_algo FP8)")
    return torch.stack([_static_amax(q, name, "k/v_bmm_quantizer") for q in enabled]).amax() / FP8_MAX


def _algorithms(model: nn.Module) -> dict[str, str | None]:
    """quant_algo per linear of the decoder layers and lm_head; one algorithm across the model."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found[name] = linear_algorithm(name, module)
    used = {a for a in found.values() if a is not None}
    if len(used) > 1:
        raise ValueError(f"the model mixes quant_algos {sorted(used)}; the legacy TensorRT-LLM checkpoint holds one")
    return found


def _check(model: nn.Module, decoder_type: str, dtype, tp: int, pp: int) -> torch.dtype:
    if decoder_type not in DECODERS:
        raise ValueError(f"decoder_type={decoder_type!r}: allowed are {sorted(DECODERS)}")
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != decoder_type:
        raise ValueError(f"decoder_type={decoder_type!r} but the model's model_type is "
                         f"{getattr(config, 'model_type', None)!r}")
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype, dtype)
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype={dtype!r}: allowed are {list(DTYPES)} (or the torch dtypes)")
    for name, value in (("inference_tensor_parallel", tp), ("inference_pipeline_parallel", pp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: expected a positive int")
    for what in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if getattr(config, what) % tp:
            raise ValueError(f"inference_tensor_parallel={tp} does not divide {what}={getattr(config, what)}")
    if config.num_hidden_layers % pp:
        raise ValueError(f"inference_pipeline_parallel={pp} does not divide num_hidden_layers="
                         f"{config.num_hidden_layers}")
    return dtype


def checkpoint_entries(model: nn.Module, dtype: torch.dtype) -> tuple[list[Entry], str | None, dict]:
    """Every tensor of the unsplit checkpoint, the quant_algo and the config's ``quantization`` dict."""
    config = model.config
    algorithms = _algorithms(model)
    entries = [Entry("transformer.vocab_embedding.weight", (model.get_input_embeddings().weight.detach().to(dtype),),
                     0, stage="first", pad=True)]
    for index in range(config.num_hidden_layers):
        entries += _layer_entries(model, index, dtype, algorithms)
    entries.append(Entry("transformer.ln_f.weight", (model.model.norm.weight.detach().to(dtype),), stage="last"))
    head = model.get_output_embeddings()
    head_algorithm = algorithms.get("lm_head")
    head_weight = head.weight.detach() if head_algorithm is None else quantized_weight("lm_head", head)
    entries += _linear_entries("lm_head", [_linear_tensors("lm_head", head_weight, head_algorithm, dtype, head)],
                               True, None, stage="last", pad=head_algorithm is None)
    algorithm = next((a for a in algorithms.values() if a is not None), None)
    quantization = {"quant_algo": algorithm,
                    "kv_cache_quant_algo": "FP8" if any(e.name.endswith("kv_cache_scaling_factor") for e in entries)
                    else None}
    if algorithm is not None:
        quantization["exclude_modules"] = sorted(_trt_module(n) for n, a in algorithms.items() if a is None)
        quantization["has_zero_point"] = False
        quantization["pre_quant_scale"] = any(e.name.endswith("prequant_scaling_factor") for e in entries)
    if algorithm == "W4A16_AWQ":
        quantization["group_size"] = _group_size(model, [n for n, a in algorithms.items() if a is not None])
    return entries, algorithm, quantization


def _group_size(model: nn.Module, names: list[str]) -> int:
    """The one INT4 group size of every quantized linear (TensorRT-LLM's config holds one)."""
    sizes = {name: quantized_weight(name, model.get_submodule(name)).group_size for name in names}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"W4A16_AWQ layers have different group sizes {sizes}; the checkpoint holds one group_size")
    return next(iter(sizes.values()))


def _trt_module(hf_name: str) -> str:
    if hf_name == "lm_head":
        return "lm_head"
    _, _, index, rest = hf_name.split(".", 3)
    if rest.startswith("self_attn.") and rest.split(".")[1] in QKV:
        return f"transformer.layers.{index}.attention.qkv"
    return f"transformer.layers.{index}.{LAYER_LINEARS[rest][0]}"


def shard(entry: Entry, tp: int, tp_rank: int) -> torch.Tensor:
    """``entry``'s tensor on tensor-parallel rank ``tp_rank`` (module docstring)."""
    if entry.axis is None:
        return entry.parts[0].contiguous()
    pieces = []
    for part in entry.parts:
        if entry.pad and part.shape[0] % tp:
            part = torch.cat([part, part.new_zeros(tp - part.shape[0] % tp, *part.shape[1:])])
        length = part.shape[entry.axis]
        if length % tp:
            raise ValueError(f"{entry.name}: dim {entry.axis} of shape {tuple(part.shape)} does not split into "
                             f"inference_tensor_parallel={tp} equal parts")
        size = length // tp
        pieces.append(part.narrow(entry.axis, tp_rank * size, size))
    return torch.cat(pieces, dim=entry.axis).contiguous()


def rank_tensors(entries: list[Entry], layers: int, tp: int, pp: int, rank: int) -> dict[str, torch.Tensor]:
    """The tensors of ``rank{rank}.safetensors`` (rank = pp_rank * tp + tp_rank), layers renumbered per stage."""
    pp_rank, tp_rank = divmod(rank, tp)
    per_stage = layers // pp
    out = {}
    for entry in entries:
        name = entry.name
        if entry.layer is not None:
            if entry.layer // per_stage != pp_rank:
                continue
            name = name.replace(f"layers.{entry.layer}.", f"layers.{entry.layer - pp_rank * per_stage}.", 1)
        elif (entry.stage == "first" and pp_rank != 0) or (entry.stage == "last" and pp_rank != pp - 1):
            continue
        out[name] = shard(entry, tp, tp_rank)
    return out


def checkpoint_config(model: nn.Module, dtype: torch.dtype, quantization: dict, tp: int, pp: int) -> dict:
    """``config.json``: the fields of TensorRT-LLM's PretrainedConfig for a Llama (module docstring)."""
    config = model.config
    dtype_name = next(k for k, v in DTYPES.items() if v == dtype)
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta}
    head_size = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {
        "producer": {"name": "lowbit", "version": __version__},
        "architecture": DECODERS[config.model_type],
        "dtype": dtype_name,
        "logits_dtype": "float32",
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "head_size": head_size,
        "norm_epsilon": config.rms_norm_eps,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings,
        "hidden_act": config.hidden_act,
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": float(rope["rope_theta"]),
        "use_parallel_embedding": True,
        "embedding_sharding_dim": 0,
        "share_embedding_table": False,
        "bias": False,
        "rmsnorm": True,
        "decoder": config.model_type,
        "mapping": {"world_size": tp * pp, "tp_size": tp, "pp_size": pp},
        "quantization": quantization,
    }


def export_tensorrt_llm_checkpoint(model: nn.Module, decoder_type: str, dtype: torch.dtype | str,
                                   export_dir: str | Path, inference_tensor_parallel: int = 1,
                                   inference_pipeline_parallel: int = 1, *, tokenizer=None,
                                   overwrite: bool = False) -> Path:
    """Write ``model`` as a TensorRT-LLM legacy checkpoint (module docstring), ModelOpt's signature.

    ``dtype`` is the dtype of unquantized weights (and AWQ scales); every rank file is built and checked in
    memory before the directory is written atomically. Returns ``export_dir``.
    """
    from safetensors.torch import save_file

    tp, pp = inference_tensor_parallel, inference_pipeline_parallel
    dtype = _check(model, decoder_type, dtype, tp, pp)
    entries, _, quantization = checkpoint_entries(model, dtype)
    ranks = [rank_tensors(entries, model.config.num_hidden_layers, tp, pp, r) for r in range(tp * pp)]
    config = checkpoint_config(model, dtype, quantization, tp, pp)
    with atomic_directory(export_dir, writer="export_tensorrt_llm_checkpoint", overwrite=overwrite) as staging:
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for rank, tensors in enumerate(ranks):
            save_file(tensors, str(staging / f"rank{rank}.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            save_tokenizer(tokenizer, staging)
    return Path(export_dir)


def export_tensorrt_llm_dir(model: nn.Module, export_dir: str | Path, *, tokenizer=None, overwrite: bool = False,
                            decoder_type: str = "llama", dtype: torch.dtype | str = torch.float16,
                            inference_tensor_parallel: int = 1, inference_pipeline_parallel: int = 1) -> Path:
    """``export_tensorrt_llm_checkpoint`` in the registry's call shape (``lowbit.export.registry``)."""
    return export_tensorrt_llm_checkpoint(model, decoder_type, dtype, export_dir, inference_tensor_parallel,
                                          inference_pipeline_parallel, tokenizer=tokenizer, overwrite=overwrite)
