"""Train the default model's tokenizer and tokenize the corpus splits for training.

Tokenizer: byte-level BPE (GPT-2 style pre-tokenizer, no prefix space), vocabulary 4096 = 256 byte
symbols + 3 special tokens (``<s>`` bos, ``</s>`` eos, ``<pad>``) + merges, merges of pairs seen at
least twice, trained with Hugging Face ``tokenizers`` on the train split only
(``.work/corpus/train.txt`` from ``tools/fetch_corpus.py``). Nothing is added around encoded text
(no bos/eos): a text file and its token stream are the same thing, which is how the model is trained
and how ``lowbit.eval.perplexity`` scores text.

Saved with ``save_pretrained`` into ``lowbit/assets/default_model/`` so that
``AutoTokenizer.from_pretrained(path)`` loads it offline.

Then the train and validation splits are encoded to ``.carry/corpus/{train,validation}.npy``
(uint16 token ids, one stream per split) for ``tools/train_default_model.py``. The held-out split is
deliberately not written there: it never travels to the training machine.

Usage: python tools/train_tokenizer.py     (about a minute on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

REPO_ROOT = Path(__file__).resolve().parents[1]
VOCAB_SIZE = 4096
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def train_bpe(documents: list[str], vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of ``vocab_size`` entries trained on ``documents``."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=512, **SPECIAL_TOKENS)


def name_class_for_every_transformers_version(config_path: Path) -> None:
    """transformers 5 writes ``tokenizer_class: TokenizersBackend``, unknown to 4.x; the 4.x name
    ``PreTrainedTokenizerFast`` loads the same tokenizer.json in both."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def text_chunks(text: str, lines_per_chunk: int = 1000) -> list[str]:
    """``text`` cut at line ends into chunks that keep their newlines (so blank-line merges are learned)."""
    lines = text.split("\n")
    return ["\n".join(lines[i : i + lines_per_chunk]) + "\n" for i in range(0, len(lines), lines_per_chunk)]


def encode_stream(tokenizer: PreTrainedTokenizerFast, text: str) -> np.ndarray:
    """The token ids of ``text`` as one uint16 array (the vocabulary fits in 16 bits)."""
    ids = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    return np.asarray(ids, dtype=np.uint16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=REPO_ROOT / ".work" / "corpus")
    parser.add_argument("--tokenizer-out", type=Path, default=REPO_ROOT / "lowbit" / "assets" / "default_model")
    parser.add_argument("--tokens-out", type=Path, default=REPO_ROOT / ".carry" / "corpus")
    args = parser.parse_args()

    train_text = (args.corpus / "train.txt").read_text(encoding="utf-8")
    tokenizer = train_bpe(text_chunks(train_text))
    tokenizer.save_pretrained(args.tokenizer_out)
    name_class_for_every_transformers_version(args.tokenizer_out / "tokenizer_config.json")

    args.tokens_out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation"):
        text = train_text if split == "train" else (args.corpus / f"{split}.txt").read_text(encoding="utf-8")
        tokens = encode_stream(tokenizer, text)
        np.save(args.tokens_out / f"{split}.npy", tokens)
        print(f"{split:10s} {len(text.encode('utf-8')):>11,d} bytes -> {len(tokens):>10,d} tokens "
              f"({len(text.encode('utf-8')) / len(tokens):.2f} bytes/token)")


if __name__ == "__main__":
    main()
