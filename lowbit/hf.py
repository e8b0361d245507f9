"""Hugging Face causal-LM directories in and out, for the command line and scripts.

- ``load_causal_lm(source)``: ``"default"`` (the bundled model), a local Hugging Face directory, or a
  directory written by :func:`save_quantized` (fake-quantized via ``lowbit.save`` or packed via
  ``lowbit.save_compressed``); returns ``(model, tokenizer)``. Nothing is downloaded.
- ``save_quantized(model, tokenizer, path, packed)``: the model's ``config.json`` and tokenizer files
  next to lowbit's state and tensors, so the directory alone is enough to load it again.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lowbit.assets import load_default_model
from lowbit.checkpoint import STATE_FILE as FAKE_QUANT_STATE
from lowbit.checkpoint import restore, write_checkpoint
from lowbit.compress import compress
from lowbit.compress.serialization import STATE_FILE as PACKED_STATE
from lowbit.compress.serialization import load_compressed, write_compressed
from lowbit.files import atomic_directory

DEFAULT_SOURCE = "default"


def saved_kind(path: str | Path) -> str:
    """``"packed"``, ``"fake_quant"`` or ``"float"``: what kind of checkpoint the directory holds."""
    directory = Path(path)
    if (directory / PACKED_STATE).is_file():
        return "packed"
    if (directory / FAKE_QUANT_STATE).is_file():
        return "fake_quant"
    return "float"


def uninitialized_causal_lm(config, dtype: torch.dtype) -> nn.Module:
    """``AutoModelForCausalLM.from_config(config)`` in ``dtype`` on the CPU, its parameters allocated but not
    initialised (transformers' ``no_init_weights``), input and output embeddings tied as the config says: for a
    model every parameter of which is read from a checkpoint next. Random initialisation would cost most of such a
    load: 25 of the 28.5 s ``lowbit ptq`` spent reloading a 1.1 GB export on the H100 machine (its CPU initialised it).
    Non-persistent buffers (rotary frequencies) are computed by the modules' constructors as usual."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    return model


def load_causal_lm(source: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
                   trust_remote_code: bool = False):
    """``(model, tokenizer)`` from ``source``, in eval mode on ``device``; float weights in ``dtype``.
    ``trust_remote_code`` lets transformers run the model directory's own code (off by default).

    A lowbit-saved directory is rebuilt from its ``config.json`` (the architecture, weights initialised
    then overwritten by the saved tensors) and its quantizers restored; packed weights keep their storage.
    """
    if str(source) == DEFAULT_SOURCE:
        return load_default_model(dtype=dtype, device=device)
    directory = Path(source)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"model={str(source)!r} is not a local Hugging Face model directory (no config.json); pass such a "
            f"directory or {DEFAULT_SOURCE!r} for the bundled model (lowbit never downloads)"
        )
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    remote = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    tokenizer = AutoTokenizer.from_pretrained(directory, **remote)
    kind = saved_kind(directory)
    if kind == "float":
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **remote)
    else:
        config = AutoConfig.from_pretrained(directory, **remote)

        def factory() -> nn.Module:
            return uninitialized_causal_lm(config, dtype)

        model = load_compressed(factory, directory) if kind == "packed" else restore(factory, directory)
    return model.to(device).eval(), tokenizer


def save_quantized(model: nn.Module, tokenizer, path: str | Path, packed: bool = False,
                   overwrite: bool = False) -> Path:
    """Write ``model`` (already quantized) with its config and tokenizer to ``path``, all at once.

    ``packed=True`` first replaces the quantized linears by packed storage (``lowbit.compress``, in
    place) and writes ``save_compressed``'s layout; otherwise ``lowbit.save``'s (float weights plus the
    quantizer states). A non-empty ``path`` that lowbit did not write is refused unless ``overwrite=True``
    (``lowbit.files.atomic_directory``). Returns the directory.
    """
    with atomic_directory(path, "lowbit.hf.save_quantized", overwrite) as staging:
        if packed:
            write_compressed(compress(model), staging)
        else:
            write_checkpoint(model, staging)
        model.config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return Path(path)
