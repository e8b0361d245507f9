"""GGUF for llama.cpp, written from lowbit's own codes and scales (``pip install lowbit[gguf]``).

Each quantized Linear goes to the GGUF type whose grid holds lowbit's exactly; the type follows from the
layer's config, one type per tensor (a file may mix them). Blocks are 32 consecutive input elements of a
row, ``d`` and ``m`` are float16:

| lowbit weight config                        | GGUF  | block bytes            | value                  |
|---------------------------------------------|-------|------------------------|------------------------|
| INT8 symmetric                              | Q8_0  | d, 32 x int8 q         | q * d                  |
| INT4 symmetric (signed)                     | Q4_0  | d, 16 B nibbles        | (q - 8) * d            |
| INT4 asymmetric, or INT4 unsigned           | Q4_1  | d, m, 16 B nibbles     | q * d + m              |
| INT4 symmetric g32 on the k-quant grid      | Q4_K  | ``lowbit.export.k_quants``                      |
| INT6 symmetric g16 on the k-quant grid      | Q6_K  | ``lowbit.export.k_quants``                      |

Nibble byte j of a block holds element j (low) and element j + 16 (high). lowbit's scale groups must be
per tensor, per output channel or blocks of a multiple of 32 along the input dim (a group of 128 is written
as four blocks with the same ``d``); anything else -- FP8, NVFP4, MX, INT4 groups of 16, INT8 asymmetric,
activation / KV-cache quantization, a pre_quant_scale (AWQ, SmoothQuant) -- is refused before writing,
naming the layer. The codes in the file are lowbit's codes exactly; ``d = float16(step)`` and
``m = float16(-zero_point * step)`` round lowbit's float32 steps (module ``lowbit.export.weights``) to
float16, so a dequantized weight differs from the fake-quantized one by at most that rounding
(relative 2**-11 of ``d``, plus ``m``'s for Q4_1). Norms are written F32; other unquantized weights F16
when the model is float16, else F32.

llama.cpp rotates interleaved pairs (GPT-J style) where transformers' Llama rotates halves, so the rows
of ``attn_q`` / ``attn_k`` are permuted per head: row ``(h, i, j)`` of the (heads, 2, head_dim / 2) view
moves to ``(h, j, i)`` -- llama.cpp's converter does the same and transformers undoes it on load.
The tokenizer (byte-level BPE: ``tokenizer.ggml.model = "gpt2"``) and the architecture metadata llama.cpp
reads are written from the model's config and tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowbit.export.k_quants import K_QUANTS, encode_k_quant, k_quant_for, on_k_quant_grid
from lowbit.export.weights import QuantizedWeight, active_activation_quantizers, quantized_weight, weight_quantizer
from lowbit.files import atomic_directory

BLOCK = 32
FILE_NAME = "model.gguf"
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5
PERMUTED = {"attn_q": "num_attention_heads", "attn_k": "num_key_value_heads"}


def _gguf():
    try:
        import gguf
    except ImportError as error:
        raise ImportError("GGUF export needs the 'gguf' package: pip install 'lowbit[gguf]'") from error
    return gguf


def gguf_type(weight: QuantizedWeight) -> str:
    """The GGUF type ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K") holding ``weight``'s grid exactly; ValueError
    naming the layer."""
    fmt = weight.format
    kind = k_quant_for(fmt.num_bits, fmt.block_size) if fmt.kind == "int" and not fmt.unsigned else None
    if kind is not None and (kind.name == "Q6_K" or on_k_quant_grid(weight, kind)):
        return kind.name
    if fmt.kind == "int" and fmt.num_bits == 8 and not fmt.unsigned:
        name = "Q8_0"
    elif fmt.kind == "int" and fmt.num_bits == 4:
        name = "Q4_1" if fmt.unsigned else "Q4_0"
    elif fmt.kind == "int_asym" and fmt.num_bits == 4:
        name = "Q4_1"
    else:
        asym = "-asym" if fmt.kind == "int_asym" else ("-unsigned" if fmt.unsigned else "")
        raise ValueError(
            f"layer {weight.name!r}: weight format {fmt.kind} {fmt.num_bits}-bit{asym} has no GGUF type that holds "
            "it exactly; GGUF export takes INT8 symmetric (Q8_0), INT4 symmetric (Q4_0; Q4_K on its grid), INT4 "
            "asymmetric or unsigned (Q4_1), INT6 symmetric in blocks of 16 (Q6_K)")
    if weight.group_size % BLOCK:
        raise ValueError(
            f"layer {weight.name!r}: {name} needs scale groups of a multiple of {BLOCK} along the input dim; this "
            f"weight {tuple(weight.codes.shape)} has groups of {weight.group_size}")
    return name


def _half(values: torch.Tensor, what: str, name: str) -> np.ndarray:
    half = values.to(torch.float16)
    if not torch.isfinite(half).all():
        raise ValueError(f"layer {name!r}: a {what} of {values.abs().max().item():.4g} overflows GGUF's float16")
    return half.numpy()


def _nibbles(q: np.ndarray) -> np.ndarray:
    """(..., 32) values 0..15 -> (..., 16) bytes: element j low, element j + 16 high."""
    return (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)


def encode_blocks(weight: QuantizedWeight, type_name: str) -> np.ndarray:
    """``weight`` as GGUF blocks: uint8 (N, K / 32 * block bytes) in the layouts of the module docstring."""
    if type_name in K_QUANTS:
        return encode_k_quant(weight, K_QUANTS[type_name])
    rows, columns = weight.codes.shape
    codes = weight.codes.reshape(rows, columns // BLOCK, BLOCK).numpy()
    step = weight.steps_per(BLOCK)
    d = _half(step, "scale", weight.name)[..., None].view(np.uint8)
    if type_name == "Q8_0":
        parts = [d, codes.astype(np.int8).view(np.uint8)]
    elif type_name == "Q4_0":
        parts = [d, _nibbles((codes + 8).astype(np.uint8))]
    else:  # Q4_1: q * d + m, m = -zero_point * step
        zero = weight.zero_points_per(BLOCK)
        minimum = torch.zeros_like(step) if zero is None else -zero * step
        m = _half(minimum, "minimum", weight.name)[..., None].view(np.uint8)
        parts = [d, m, _nibbles(codes.astype(np.uint8))]
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def rope_permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """Rows (heads * head_dim, ...) reordered from halves to interleaved pairs (module docstring)."""
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _check_llama(model: nn.Module):
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "llama":
        raise ValueError(f"model_type={getattr(config, 'model_type', None)!r}: GGUF export supports 'llama'")
    rope = getattr(config, "rope_parameters", None) or {"rope_type": "default", "rope_theta": config.rope_theta}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_parameters={rope!r}: GGUF export supports rope_type 'default' only")
    return config, float(rope["rope_theta"])


def _check_layers(model: nn.Module) -> None:
    for name, module in model.named_modules():
        for attribute, quantizer in active_activation_quantizers(module):
            raise ValueError(
                f"layer {name!r}: {attribute} ({quantizer.extra_repr()}) is active; GGUF holds quantized weights "
                "only (no activation quantization, no pre_quant_scale): export a weight-only config")
        for attribute in ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer"):
            quantizer = getattr(module, attribute, None)
            if quantizer is not None and quantizer.is_enabled:
                raise ValueError(f"layer {name!r}: {attribute} is enabled; GGUF holds no KV-cache quantization")


def plan_tensors(model: nn.Module) -> list[tuple[str, np.ndarray, str]]:
    """Every tensor of the file as (GGUF name, data, type name), validated before anything is written."""
    gguf = _gguf()
    config, _ = _check_llama(model)
    _check_layers(model)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    float_type = "F16" if next(model.parameters()).dtype == torch.float16 else "F32"
    planned = []
    for key, value in model.state_dict().items():
        if "_quantizer." in key or (key == "lm_head.weight" and config.tie_word_embeddings):
            continue
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ValueError(f"tensor {key!r} has no llama GGUF name")
        module_name = key.rsplit(".", 1)[0]
        module = model.get_submodule(module_name)
        if key.endswith(".weight") and weight_quantizer(module_name, module) is not None:
            weight = quantized_weight(module_name, module)
            type_name = gguf_type(weight)
            data = encode_blocks(weight, type_name)
        elif value.dim() == 1:
            data, type_name = value.detach().float().numpy(), "F32"
        else:
            type_name = float_type
            data = value.detach().to(torch.float16 if float_type == "F16" else torch.float32).numpy()
        role = target.split(".")[-2] if target.startswith("blk.") else ""
        if role in PERMUTED:
            data = rope_permute(data, getattr(config, PERMUTED[role]))
        planned.append((target, data, type_name))
    return planned


def tokenizer_metadata(tokenizer, vocab_size: int) -> dict:
    """llama.cpp's tokenizer keys for a byte-level BPE tokenizer, padded with unused tokens to ``vocab_size``."""
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    model, pre = data["model"], data.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel":
        raise ValueError(f"tokenizer model {model.get('type')!r} with pre-tokenizer {pre.get('type')!r}: GGUF "
                         "export supports byte-level BPE (model 'BPE', pre-tokenizer 'ByteLevel')")
    tokens: dict[int, tuple[str, int]] = {index: (token, TOKEN_NORMAL) for token, index in model["vocab"].items()}
    for added in data.get("added_tokens", []):
        tokens[added["id"]] = (added["content"], TOKEN_CONTROL if added["special"] else TOKEN_USER_DEFINED)
    if max(tokens) >= vocab_size:
        raise ValueError(f"tokenizer has token id {max(tokens)} >= the model's vocab_size {vocab_size}")
    table = [tokens.get(i, (f"[PAD{i}]", TOKEN_UNUSED)) for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    encoded = tokenizer("a")["input_ids"]
    return {
        "tokens": [token for token, _ in table],
        "token_types": [kind for _, kind in table],
        "merges": merges,
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "add_bos": bool(encoded) and encoded[0] == tokenizer.bos_token_id,
        "add_eos": bool(encoded) and encoded[-1] == tokenizer.eos_token_id,
    }


def _write(path: Path, model: nn.Module, planned: list, tokens: dict) -> None:
    gguf = _gguf()
    config, rope_theta = _check_llama(model)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(Path(str(getattr(config, "_name_or_path", "") or "lowbit")).name or "lowbit")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope_theta)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(_file_type(gguf, planned))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens["tokens"])
    writer.add_token_types(tokens["token_types"])
    writer.add_token_merges(tokens["merges"])
    for key, adder in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                       ("pad", writer.add_pad_token_id)):
        if tokens[key] is not None:
            adder(tokens[key])
    writer.add_add_bos_token(tokens["add_bos"])
    writer.add_add_eos_token(tokens["add_eos"])
    for name, data, type_name in planned:
        writer.add_tensor(name, data, raw_dtype=getattr(gguf.GGMLQuantizationType, type_name))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _file_type(gguf, planned: list) -> int:
    """llama.cpp's ``general.file_type``: the type of most quantized elements (F32 / F16 when none)."""
    counts: dict[str, int] = {}
    for _, data, type_name in planned:
        counts[type_name] = counts.get(type_name, 0) + data.size
    quantized = {k: v for k, v in counts.items() if k.startswith("Q")}
    if not quantized:
        return gguf.LlamaFileType.MOSTLY_F16 if "F16" in counts else gguf.LlamaFileType.ALL_F32
    most = max(quantized, key=quantized.get)
    return getattr(gguf.LlamaFileType, "MOSTLY_" + ("Q4_K_S" if most == "Q4_K" else most))  # S: Q4_K throughout


def export_gguf(model: nn.Module, export_dir: str | Path, *, tokenizer=None, overwrite: bool = False,
                file_name: str = FILE_NAME) -> Path:
    """Write ``model`` (a quantized Llama) and ``tokenizer`` as ``export_dir/file_name`` for llama.cpp.

    Every tensor is planned and checked first (module docstring: a layer no GGUF type holds exactly is a
    ValueError naming it); the directory is written atomically. Returns the file's path. Load it with
    ``transformers.AutoModelForCausalLM.from_pretrained(export_dir, gguf_file=file_name)`` or llama.cpp.
    """
    if tokenizer is None:
        raise ValueError("tokenizer=None: a GGUF file carries the tokenizer; pass the model's tokenizer")
    planned = plan_tensors(model)
    tokens = tokenizer_metadata(tokenizer, model.config.vocab_size)
    with atomic_directory(export_dir, writer="export_gguf", overwrite=overwrite) as staging:
        _write(staging / file_name, model, planned, tokens)
    return Path(export_dir) / file_name
