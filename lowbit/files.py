"""Atomic writing of output directories, and reading their files back with errors that name the file.

Every writer (``save``, ``save_compressed``, ``hf.save_quantized``, the exporters) fills a temporary directory
beside its target and renames it into place in one step, so a failure halfway leaves nothing behind and a reader
never sees half a checkpoint. A directory that lowbit wrote carries the marker file ``MARKER``; writing over a
non-empty directory without it is refused unless ``overwrite=True``.

Every loader reads its JSON with :func:`read_json` and its tensors with :func:`read_tensors`: a missing, truncated
or corrupt file raises an error naming the file, the problem and the writer (from the marker, when there is one).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

MARKER = ".lowbit-written"


def written_by_lowbit(directory: Path) -> bool:
    """Whether ``directory`` holds the marker that lowbit's writers leave."""
    return (directory / MARKER).is_file()


def check_writable(path: str | Path, overwrite: bool) -> Path:
    """The target as a Path, after refusing a file, or a non-empty directory lowbit did not write."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"path={str(target)!r} is a file; a writer needs a directory path")
    if target.is_dir() and any(target.iterdir()) and not written_by_lowbit(target) and not overwrite:
        raise FileExistsError(
            f"path={str(target)!r} is a non-empty directory that lowbit did not write (no {MARKER}); "
            "pass overwrite=True to replace it or choose an empty or new directory")
    return target


@contextmanager
def atomic_directory(path: str | Path, writer: str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path``; on success it replaces ``path`` whole.

    ``writer`` names the function that writes (recorded in the marker). On an exception the temporary
    directory is removed and ``path`` is left exactly as it was.
    """
    target = check_writable(path, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _fresh_sibling(target, "tmp")
    os.mkdir(staging, 0o777)  # the umask applies, as for a plain mkdir; mkdtemp would give 0o700
    try:
        yield staging
        (staging / MARKER).write_text(json.dumps({"writer": writer}) + "\n")
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            target.rename(retired / target.name)
            staging.rename(target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def origin(directory: Path, expected_writer: str) -> str:
    """Who wrote ``directory``, as its marker says, for error messages; else that ``expected_writer`` should have."""
    try:
        writer = json.loads((directory / MARKER).read_text())["writer"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"expected a directory written by {expected_writer}; it has no readable {MARKER} marker"
    return f"the {MARKER} marker says {writer} wrote it"


def read_json(file: Path, expected_writer: str) -> dict[str, Any]:
    """The JSON object in ``file``; FileNotFoundError or ValueError naming the file, the problem and the writer."""
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file ({origin(file.parent, expected_writer)})")
    try:
        state = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{file}: not JSON, truncated or corrupt ({error}; "
                         f"{origin(file.parent, expected_writer)})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{file}: expected a JSON object, found {type(state).__name__} "
                         f"({origin(file.parent, expected_writer)})")
    return state


def read_tensors(file: Path, expected_writer: str) -> dict[str, Tensor]:
    """Every tensor in the safetensors ``file`` (on CPU); FileNotFoundError or ValueError naming the file, the
    problem (safetensors' own words: truncated, bad header ...) and the writer."""
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file ({origin(file.parent, expected_writer)})")
    try:
        return load_file(str(file))
    except SafetensorError as error:
        raise ValueError(f"{file}: not a readable safetensors file, truncated or corrupt ({error}; "
                         f"{origin(file.parent, expected_writer)})") from None


@contextmanager
def atomic_file(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; on success it replaces ``path`` in one rename.

    An existing file is refused unless ``overwrite``, a directory always. On an exception the temporary
    file is removed and ``path`` is left exactly as it was.
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"path={str(target)!r} is a directory; a single-file writer needs a file path")
    if target.exists() and not overwrite:
        raise FileExistsError(f"path={str(target)!r} exists; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _fresh_sibling(target, "tmp")
    # created exclusively with mode 0o666 so the umask applies, as for open(path, "w"); mkstemp would give 0o600
    os.close(os.open(staging, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield Path(staging)
        os.replace(staging, target)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def _fresh_sibling(target: Path, kind: str) -> Path:
    """A new hidden name beside ``target`` (``.NAME.KIND-<random hex>``) for staging a write."""
    return target.parent / f".{target.name}.{kind}-{secrets.token_hex(8)}"
