"""What every export writes beside its tensors: the model's config, generation config and tokenizer.

``save_model_files(model, tokenizer, directory, quantization_config)`` writes ``config.json`` (with
``quantization_config`` when given), ``generation_config.json`` (when the model has one) and the tokenizer
files with the padding side the tokenizer was loaded with (calibration often switches it to "left"; the
switch is undone in the files, and the tokenizer object is left as it was).
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn


def loaded_padding_side(tokenizer) -> str | None:
    """The padding side from the tokenizer's own files (its init kwargs), else its current one."""
    return tokenizer.init_kwargs.get("padding_side", getattr(tokenizer, "padding_side", None))


def save_tokenizer(tokenizer, directory: Path) -> None:
    """``tokenizer.save_pretrained(directory)`` with the padding side it was loaded with."""
    current = tokenizer.padding_side
    tokenizer.padding_side = loaded_padding_side(tokenizer)
    try:
        tokenizer.save_pretrained(directory)
    finally:
        tokenizer.padding_side = current


def save_model_files(model: nn.Module, tokenizer, directory: Path, quantization_config: dict | None = None) -> None:
    """config.json (+ ``quantization_config``), generation_config.json and the tokenizer into ``directory``."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ValueError(f"model ({type(model).__name__}) has no Hugging Face config: exports need a "
                         "transformers PreTrainedModel")
    data = config.to_dict()
    data.pop("quantization_config", None)
    if quantization_config is not None:
        data["quantization_config"] = quantization_config
    (directory / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(directory)
    if tokenizer is not None:
        save_tokenizer(tokenizer, directory)
