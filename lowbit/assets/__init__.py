"""Files shipped with lowbit: the default language model and the text fixtures.

``default_model/`` holds a small trained Llama (8.4 M parameters, bf16 safetensors) and its byte-level
BPE tokenizer; ``gpt2_model/`` a small trained GPT-2 (3.8 M parameters: ``Conv1D`` layers, tied
embeddings) on the same corpus and tokenizer; ``text/`` holds a held-out evaluation text and a
calibration text. Provenance, licences and measured figures: README.md in this folder. Everything
loads offline.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import torch


def default_model_path() -> Path:
    """Folder of the bundled default model (config, safetensors shards, tokenizer files)."""
    return Path(str(files(__name__) / "default_model"))


def bundled_text(name: str) -> str:
    """Contents of a bundled text fixture (UTF-8): ``"heldout"`` (never trained or calibrated on)
    or ``"calibration"`` (from the training split)."""
    if name not in ("heldout", "calibration"):
        raise ValueError(f"name must be 'heldout' or 'calibration', got {name!r}")
    return files(__name__).joinpath("text", f"{name}.txt").read_text(encoding="utf-8")


def gpt2_model_path() -> Path:
    """Folder of the bundled GPT-2 fixture (config and safetensors; its tokenizer is the default model's)."""
    return Path(str(files(__name__) / "gpt2_model"))


def load_default_model(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load the bundled model and tokenizer from disk only (no hub access).

    Returns ``(model, tokenizer)``: a ``LlamaForCausalLM`` in ``dtype`` on ``device``, in eval mode,
    and the tokenizer (``AutoTokenizer``; adds no special tokens around encoded text).
    """
    return _load(default_model_path(), dtype, device)


def load_gpt2_model(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load the bundled GPT-2 fixture and the shared tokenizer from disk only, as :func:`load_default_model`:
    ``(GPT2LMHeadModel in eval mode, tokenizer)``."""
    return _load(gpt2_model_path(), dtype, device)


def _load(path: Path, dtype: torch.dtype, device: str | torch.device):
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Load in the stored dtype (bf16), then cast: exact for wider dtypes, and the same on every
    # transformers version (their default load dtype differs).
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)
    return model.to(device=device, dtype=dtype).eval(), tokenizer
