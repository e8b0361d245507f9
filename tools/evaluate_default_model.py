"""Measure the figures recorded in lowbit/assets/README.md for the bundled default model.

1. Held-out perplexity: ``lowbit.eval.perplexity`` of the model (fp32, CPU) on the bundled held-out
   text, seq_len 256, stride 128 (every token but the first scored once).
2. Unigram baseline on the same scored tokens: p(t) = (count_t + 1) / (N + V), counts over the N train
   tokens (``.carry/corpus/train.npy`` from ``tools/train_tokenizer.py``), V = 4096 (add-one smoothing).

Usage: python tools/evaluate_default_model.py [--model gpt2]     (a few minutes on 2 CPU cores)
``--model gpt2`` measures the GPT-2 fixture (``lowbit.assets.load_gpt2_model``) the same way.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
from pathlib import Path

import numpy as np
import torch
import transformers

from lowbit.assets import load_default_model, load_gpt2_model
from lowbit.data import default_eval_text, token_stream
from lowbit.eval import format_table, model_size, perplexity

REPO_ROOT = Path(__file__).resolve().parents[1]


def unigram_perplexity(train_tokens: np.ndarray, scored_tokens: np.ndarray, vocab_size: int) -> float:
    """exp of the mean NLL of ``scored_tokens`` under add-one-smoothed unigram counts of ``train_tokens``."""
    counts = np.bincount(train_tokens, minlength=vocab_size).astype(np.float64)
    log_probs = np.log(counts + 1.0) - np.log(counts.sum() + vocab_size)
    return math.exp(-log_probs[scored_tokens].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-tokens", type=Path, default=REPO_ROOT / ".carry" / "corpus" / "train.npy")
    parser.add_argument("--model", choices=("default", "gpt2"), default="default")
    args = parser.parse_args()

    load = load_gpt2_model if args.model == "gpt2" else load_default_model
    model, tokenizer = load(dtype=torch.float32, device="cpu")
    text = default_eval_text()
    heldout = token_stream(tokenizer, text).numpy()
    model_ppl = perplexity(model, tokenizer, text, seq_len=256, stride=128)
    unigram_ppl = unigram_perplexity(np.load(args.train_tokens), heldout[1:], len(tokenizer))
    rows = [
        {"model": f"{args.model} model (fp32, CPU)", "heldout_tokens_scored": len(heldout) - 1,
         "perplexity": model_ppl},
        {"model": "unigram, add-one (train split)", "heldout_tokens_scored": len(heldout) - 1,
         "perplexity": unigram_ppl},
    ]
    print(format_table(rows))
    print(f"parameters {sum(p.numel() for p in model.parameters()):,d}; fp32 size {model_size(model):,d} bytes")
    print(f"date {datetime.date.today()}; CPU {platform.processor() or platform.machine()}; "
          f"torch {torch.__version__}; transformers {transformers.__version__}")


if __name__ == "__main__":
    main()
