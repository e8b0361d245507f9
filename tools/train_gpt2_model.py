"""Train lowbit's second fixture: a small GPT-2 (``Conv1D`` layers, tied embeddings) on the default corpus.

Corpus, tokenizer, batches, optimiser, schedule and the kept-run rule: those of
``tools/train_default_model.py`` (same train/validation token streams from ``tools/train_tokenizer.py``,
same 4096-entry byte-level BPE tokenizer); only the model differs.
Model      : ``GPT2LMHeadModel``, n_embd 256, 4 layers, 4 heads, n_inner 768, 512 positions, vocabulary
             4096, tied input embedding and lm_head: 3 813 888 parameters (7.6 MB in bf16). Every
             Conv1D's input dim (256 or 768) is a multiple of 128.
Training   : on the shared 2-core CPU, one run (a fraction of an epoch fits the ~15-minute budget);
             dropout off (the run is far shorter than one epoch).
Command    : from the repository root, after ``tools/fetch_corpus.py`` and ``tools/train_tokenizer.py``:
             python tools/train_gpt2_model.py --device cpu --threads 2 --epochs 0.3 --batch-size 16 \\
                 --time-budget-s 1200 --out .work/gpt2_model
             then copy ``config.json``, ``generation_config.json`` and ``model.safetensors`` into
             ``lowbit/assets/gpt2_model/`` (the tokenizer is the default model's) and run
             ``python tools/evaluate_default_model.py --model gpt2`` for the recorded figures.
"""

from __future__ import annotations

from train_default_model import main
from transformers import GPT2Config


def gpt2_model_config() -> GPT2Config:
    """The architecture of lowbit's GPT-2 fixture (token ids match tools/train_tokenizer.py)."""
    return GPT2Config(
        n_embd=256,
        n_layer=4,
        n_head=4,
        n_inner=768,
        n_positions=512,
        vocab_size=4096,
        tie_word_embeddings=True,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )


if __name__ == "__main__":
    main(gpt2_model_config(), __doc__)
