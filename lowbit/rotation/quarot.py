"""QuaRot (Ashkboos et al. 2024): randomised Hadamard rotations fused into a Llama-style model's weights,
so that weights and activations lose their outlier channels while the float model's output stays the same.

Row convention: a linear computes ``y = x W^T`` on rows ``x``; ``R`` is orthogonal (``R R^T = I``).

1. Fold each RMSNorm's scale ``g`` into the linears that read it (``W <- W diag(g)``, ``g <- 1``): the
   norm without a scale, ``x / rms(x)``, commutes with any rotation (``rms(x R) = rms(x)``).
2. Residual stream, ``R1`` (hidden size): every hidden state becomes ``h R1``. The embedding rows
   ``E <- E R1``; every reader of the stream (q, k, v, gate, up, lm_head) ``W <- W R1``; every writer
   (o_proj, down_proj) ``W <- R1^T W`` and its bias ``b <- b R1``.
3. Attention values and output, ``R2`` (head size, ``attention=True``): each value head ``v <- v R2``
   (``W_v <- R2^T W_v`` head by head, bias likewise); attention mixes positions linearly, so each output
   head is rotated the same way, and ``o_proj`` takes ``W_o <- W_o R2`` on each head's columns.
4. Down-projection input, ``R4`` (intermediate size, ``down_proj=True``): ``W_down <- W_down R4`` and the
   input rotated online, ``x <- x R4``, by a forward pre-hook on ``down_proj`` (QuaRot's online Hadamard:
   ``act(gate) * up`` has no weight of its own to absorb it). The hook is part of the model in memory only:
   saving or exporting such a model is refused (:func:`check_no_online_rotation`).

Each ``R`` is a :class:`lowbit.rotation.hadamard.RandomHadamard` (seeded signs); the products are taken in
float64 and stored in the weights' dtype. Supported: decoder-only models with ``model.embed_tokens``,
``model.layers[i].self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``, RMSNorms and an untied ``lm_head``
(Llama, Mistral, Qwen2/3); anything else is refused with the missing piece named, before any change.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lowbit.rotation.hadamard import RandomHadamard

ROTATION_OPTIONS = {"seed": 0, "attention": True, "down_proj": True}
READERS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
           "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}
WRITERS = ("self_attn.o_proj", "mlp.down_proj")


def _is_rms_norm(module: nn.Module) -> bool:
    return "RMSNorm" in type(module).__name__ and getattr(module, "bias", None) is None


def check_rotatable(model: nn.Module) -> None:
    """ValueError naming what is missing unless ``model`` has the layout of the module docstring."""
    decoder = getattr(model, "model", None)
    for name in ("embed_tokens", "layers", "norm"):
        if getattr(decoder, name, None) is None:
            raise ValueError(f"rotation: {type(model).__name__} has no model.{name}; supported are Llama-style "
                             "decoders (model.embed_tokens, model.layers, model.norm, lm_head)")
    if not isinstance(getattr(model, "lm_head", None), nn.Module):
        raise ValueError(f"rotation: {type(model).__name__} has no lm_head")
    if model.lm_head.weight is decoder.embed_tokens.weight:
        raise ValueError("rotation: lm_head is tied to the embedding; folding the final norm into lm_head "
                         "would change the embedding too (untie them first)")
    norms = [("model.norm", decoder.norm)]
    for index, layer in enumerate(decoder.layers):
        for path in (*READERS, *(n for names in READERS.values() for n in names), *WRITERS):
            if not _has(layer, path):
                raise ValueError(f"rotation: model.layers.{index} has no {path}")
        norms += [(f"model.layers.{index}.{n}", layer.get_submodule(n)) for n in READERS]
    for name, norm in norms:
        if not _is_rms_norm(norm):
            raise ValueError(f"rotation: {name} is a {type(norm).__name__}; only RMSNorm (no bias) commutes with "
                             "a rotation")


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _set(parameter: Tensor, value: Tensor) -> None:
    with torch.no_grad():
        parameter.copy_(value.to(parameter.dtype))


def _fold_norm(norm: nn.Module, readers: list[nn.Module]) -> None:
    scale = norm.weight.detach().double()
    for linear in readers:
        _set(linear.weight, linear.weight.detach().double() * scale)
    _set(norm.weight, torch.ones_like(scale))


def _rotate_reader(linear: nn.Module, rotation: RandomHadamard) -> None:
    """``W <- W R`` over the input axis."""
    _set(linear.weight, rotation.right(linear.weight.detach().double()))


def _rotate_writer(linear: nn.Module, rotation: RandomHadamard) -> None:
    """``W <- R^T W`` over the output axis, ``b <- b R``."""
    _set(linear.weight, rotation.right(linear.weight.detach().double().T).T)
    if getattr(linear, "bias", None) is not None:
        _set(linear.bias, rotation.right(linear.bias.detach().double()))


def _rotate_heads(attention: nn.Module, rotation: RandomHadamard, head_dim: int) -> None:
    """``R2`` on each value head (rows of v_proj) and on each head's columns of o_proj."""
    v_proj, o_proj = attention.v_proj, attention.o_proj
    weight = v_proj.weight.detach().double()
    heads = weight.reshape(-1, head_dim, weight.shape[1])  # (kv_heads, head_dim, in)
    _set(v_proj.weight, rotation.right(heads.transpose(1, 2)).transpose(1, 2).reshape(weight.shape))
    if getattr(v_proj, "bias", None) is not None:
        _set(v_proj.bias, rotation.right(v_proj.bias.detach().double().reshape(-1, head_dim)).reshape(-1))
    weight = o_proj.weight.detach().double()
    _set(o_proj.weight, rotation.right(weight.reshape(weight.shape[0], -1, head_dim)).reshape(weight.shape))


def fold_norms(model: nn.Module) -> None:
    """Step 1: every RMSNorm's scale folded into its readers (the final norm's into lm_head)."""
    for layer in model.model.layers:
        for norm_name, readers in READERS.items():
            _fold_norm(layer.get_submodule(norm_name), [layer.get_submodule(r) for r in readers])
    _fold_norm(model.model.norm, [model.lm_head])


class OnlineRotation:
    """A forward pre-hook rotating a module's first input: ``x <- x R`` (QuaRot's online Hadamard)."""

    def __init__(self, rotation: RandomHadamard) -> None:
        self.rotation = rotation

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return (self.rotation.right(args[0]), *args[1:])


def rotate(model: nn.Module, seed: int = 0, attention: bool = True, down_proj: bool = True) -> nn.Module:
    """Fuse QuaRot's rotations into ``model`` in place (steps 1-4 of the module docstring); returns it.

    ``seed`` draws the signs of every rotation (R1, R2 and R4 from ``seed``, ``seed + 1``, ``seed + 2``).
    The float model's outputs are unchanged up to rounding (float32: ~1e-6 relative on the logits).
    """
    check_rotatable(model)
    decoder = model.model
    layers = list(decoder.layers)
    hidden = decoder.embed_tokens.weight.shape[1]
    residual = RandomHadamard(hidden, seed)
    fold_norms(model)
    _set(decoder.embed_tokens.weight, residual.right(decoder.embed_tokens.weight.detach().double()))
    _rotate_reader(model.lm_head, residual)
    for layer in layers:
        for readers in READERS.values():
            for path in readers:
                _rotate_reader(layer.get_submodule(path), residual)
        for path in WRITERS:
            _rotate_writer(layer.get_submodule(path), residual)
        attention_module = layer.self_attn
        if attention:
            head_dim = getattr(attention_module, "head_dim", hidden // model.config.num_attention_heads)
            _rotate_heads(attention_module, RandomHadamard(head_dim, seed + 1), head_dim)
        if down_proj:
            down = layer.mlp.down_proj
            rotation = RandomHadamard(down.weight.shape[1], seed + 2)
            _rotate_reader(down, rotation)
            down.register_forward_pre_hook(OnlineRotation(rotation))
    return model


def check_no_online_rotation(model: nn.Module, what: str) -> None:
    """ValueError naming the first module with an online rotation (``down_proj=True``): ``what`` (a save or an
    export) would write its weights without the rotation of its input, and the saved model would be wrong."""
    for name, module in model.named_modules():
        if any(isinstance(hook, OnlineRotation) for hook in module._forward_pre_hooks.values()):
            raise ValueError(f"{what}: {name} rotates its input online (QuaRot's down_proj Hadamard), which the "
                             "saved model cannot carry; quantize with rotate={'down_proj': False} to save or export")


def check_rotation_options(options: dict | bool) -> dict | None:
    """The ``rotate`` option of an algorithm: False (none), True (defaults) or a dict over
    ``ROTATION_OPTIONS``; returns the full options or None. Errors name the key and what is allowed."""
    if options is False:
        return None
    if options is True:
        return dict(ROTATION_OPTIONS)
    if not isinstance(options, dict):
        raise TypeError(f"rotate={options!r}: expected True, False or a dict of {sorted(ROTATION_OPTIONS)}")
    unknown = sorted(set(options) - set(ROTATION_OPTIONS))
    if unknown:
        raise ValueError(f"rotate got unknown options {unknown}; allowed: {sorted(ROTATION_OPTIONS)}")
    merged = {**ROTATION_OPTIONS, **options}
    if isinstance(merged["seed"], bool) or not isinstance(merged["seed"], int):
        raise TypeError(f"rotate: seed={merged['seed']!r} must be an int")
    for key in ("attention", "down_proj"):
        if not isinstance(merged[key], bool):
            raise TypeError(f"rotate: {key}={merged[key]!r} must be True or False")
    return merged
