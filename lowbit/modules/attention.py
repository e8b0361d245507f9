"""KV-cache / attention-bmm quantizers for Hugging Face attention modules.

Transformers' attention modules hand (query, key, value) to a function looked up by name in
``transformers.AttentionInterface``. lowbit registers one more function, ``"lowbit"``, that applies the
module's ``q_bmm_quantizer`` / ``k_bmm_quantizer`` / ``v_bmm_quantizer`` and then calls the model's own
implementation (sdpa, eager, flash...). Keys and values arrive after the cache update, so with a static
per-tensor scale the result equals storing a quantized cache (fake quantization is idempotent).

Which classes qualify: a class named ``*Attention`` with a ``config`` whose module file dispatches
through ``ALL_ATTENTION_FUNCTIONS`` (Llama, Mistral, Qwen, GPT-2, ... in transformers >= 4.48).
"""

from __future__ import annotations

import sys
import weakref

import torch
from torch import nn
from transformers import AttentionInterface

from lowbit.modules.registry import QUANT_MODULE_REGISTRY, QuantModuleMixin, register

IMPLEMENTATION_NAME = "lowbit"
_INNER_IMPLEMENTATION: dict[int, tuple[weakref.ref, str]] = {}  # id(config) -> (config, its own implementation)


class QuantAttentionMixin(QuantModuleMixin):
    """Adds q/k/v bmm quantizers; the forward is the original class's (see the module docstring)."""

    quantizer_names = ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer")

    def _setup(self) -> None:
        super()._setup()
        config = self.config
        if config._attn_implementation != IMPLEMENTATION_NAME:
            _INNER_IMPLEMENTATION[id(config)] = (weakref.ref(config), config._attn_implementation)
            config._attn_implementation = IMPLEMENTATION_NAME
        # every attention module of a model shares its config: the later ones find it switched already
        reference, inner = _INNER_IMPLEMENTATION.get(id(config), (None, "sdpa"))
        self.inner_attn_implementation = inner if reference is not None and reference() is config else "sdpa"
        # looked up here, not per call: torch.compile cannot trace the lookup's import of transformers (torch 2.11)
        self.inner_attention = _look_up_inner_attention(self)


def _inner_attention(module: nn.Module):
    """The attention function the module's model would call itself (its ``inner_attn_implementation``)."""
    return vars(module).get("inner_attention") or _look_up_inner_attention(module)


def _look_up_inner_attention(module: nn.Module):
    name = getattr(module, "inner_attn_implementation", "sdpa")
    original = getattr(type(module), "original_class", type(module))
    model_file = sys.modules[original.__module__]
    return AttentionInterface().get_interface(name, model_file.eager_attention_forward)


def quantized_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, **kwargs):
    """The ``"lowbit"`` attention implementation: quantize q, k, v, then attend as the model would."""
    if hasattr(module, "k_bmm_quantizer"):
        query = module.q_bmm_quantizer(query)
        key = module.k_bmm_quantizer(key)
        value = module.v_bmm_quantizer(value)
    return _inner_attention(module)(module, query, key, value, attention_mask, **kwargs)


def is_hf_attention(module: nn.Module) -> bool:
    cls = type(module)
    model_file = sys.modules.get(cls.__module__)
    return (
        cls.__name__.endswith("Attention")
        and hasattr(getattr(module, "config", None), "_attn_implementation")
        and model_file is not None
        and hasattr(model_file, "ALL_ATTENTION_FUNCTIONS")
        and hasattr(model_file, "eager_attention_forward")
    )


def register_hf_attention(module: nn.Module) -> bool:
    """Register a quantized class for this module's HF attention class (once); False if not one."""
    cls = type(module)
    if cls in QUANT_MODULE_REGISTRY:
        return True
    if not is_hf_attention(module):
        return False
    AttentionInterface.register(IMPLEMENTATION_NAME, quantized_attention)
    quantized_cls = type(f"Quant{cls.__name__}", (QuantAttentionMixin, cls), {"__module__": __name__})
    register(original_cls=cls, quantized_cls=quantized_cls)
    return True
