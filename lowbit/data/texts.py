"""Text inputs: the bundled fixtures, and reading a str / list / .txt / .jsonl into plain texts."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lowbit.assets import bundled_text

TEXT_FILE_SUFFIXES = (".txt", ".jsonl")


def default_calibration_text() -> str:
    """The bundled calibration text (~200 KB of English, from the default model's training split)."""
    return bundled_text("calibration")


def default_eval_text() -> str:
    """The bundled held-out evaluation text (~250 KB of English the default model never saw)."""
    return bundled_text("heldout")


def read_texts(texts: str | os.PathLike | list[str]) -> list[str]:
    """Normalize ``texts`` to a list of strings.

    Accepted: a list of str; a ``pathlib.Path`` (or a one-line str ending in ``.txt``/``.jsonl``) naming
    a ``.txt`` file (the whole file is one text) or a ``.jsonl`` file (one text per line, from its
    ``"text"`` field); any other str is the text itself.
    """
    if isinstance(texts, list):
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a list of str; it holds a non-str item")
        return texts
    if isinstance(texts, str) and not (texts.endswith(TEXT_FILE_SUFFIXES) and "\n" not in texts):
        return [texts]
    if not isinstance(texts, (str, os.PathLike)):
        raise TypeError(f"texts must be a str, a list of str or a path, got {type(texts).__name__}")
    return _read_text_file(Path(texts))


def _read_text_file(path: Path) -> list[str]:
    if path.suffix not in TEXT_FILE_SUFFIXES:
        raise ValueError(f"texts path must end in .txt or .jsonl, got {str(path)!r}")
    if not path.is_file():
        raise FileNotFoundError(f"texts file {str(path)!r} does not exist")
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{path}:{number}: each .jsonl line must be an object with a str 'text' field")
        texts.append(record["text"])
    return texts
