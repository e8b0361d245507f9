"""Read the character vectors that an installed R package keeps in its lazy-load data base.

An installed CRAN package stores its data sets in ``data/Rdata.rdx`` (a gzip'd serialized index:
a named list ``variables`` of ``(offset, length)`` pairs into the ``.rdb`` file) and ``data/Rdata.rdb``
(at each offset: a 4-byte big-endian uncompressed length, then a zlib stream holding one object in
R's XDR serialization format, version 2 or 3). This reader understands the subset of that format
that plain data sets use: NULL, symbols, pairlists (attributes), character, logical, integer,
double and generic vectors. Anything else raises ValueError. A vector with a ``names`` attribute
comes back as a dict (name -> element), any other vector as a list; other attributes are dropped.

Used only by ``tools/fetch_corpus.py`` so that no R installation is needed.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

NILSXP, SYMSXP, LISTSXP, CHARSXP = 0, 1, 2, 9
LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP, EXPRSXP = 10, 13, 14, 16, 19, 20
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, EMPTYENV_SXP, BASEENV_SXP = 255, 254, 253, 242, 241
NA_INTEGER = -(2**31)
IS_OBJECT_BIT, HAS_ATTR_BIT, HAS_TAG_BIT = 1 << 8, 1 << 9, 1 << 10


class _XdrReader:
    """Sequential reader of R's XDR (big-endian) serialization stream."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0
        self.references: list[object] = []

    def _int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def _bytes(self, count: int) -> bytes:
        chunk = self.data[self.pos : self.pos + count]
        self.pos += count
        return chunk

    def read_header(self) -> None:
        if self._bytes(2) != b"X\n":
            raise ValueError("only R's XDR serialization format ('X\\n') is supported")
        version = self._int()
        self._int()  # writer R version
        self._int()  # minimal reader R version
        if version == 3:
            self._bytes(self._int())  # native encoding name
        elif version != 2:
            raise ValueError(f"R serialization version {version} is not supported (2 or 3)")

    def read_item(self) -> object:
        flags = self._int()
        sexp_type = flags & 0xFF
        if sexp_type in (NILVALUE_SXP, NILSXP, GLOBALENV_SXP, EMPTYENV_SXP, BASEENV_SXP):
            return None
        if sexp_type == REFSXP:
            index = flags >> 8 if flags >> 8 else self._int()
            return self.references[index - 1]
        if sexp_type == SYMSXP:
            name = self.read_item()
            self.references.append(name)
            return name
        if sexp_type == LISTSXP:
            return self._read_pairlist(flags)
        if sexp_type == CHARSXP:
            length = self._int()
            return None if length == -1 else self._bytes(length).decode("utf-8", errors="replace")
        values = self._read_vector(sexp_type)
        attributes = self._read_pairlist_item() if flags & HAS_ATTR_BIT else {}
        names = attributes.get("names")
        return dict(zip(names, values, strict=True)) if names is not None else values

    def _read_pairlist_item(self) -> dict[str, object]:
        item = self.read_item()
        if not isinstance(item, dict):
            raise ValueError("R attributes must be a pairlist")
        return item

    def _read_pairlist(self, flags: int) -> dict[str, object]:
        items: dict[str, object] = {}
        while True:
            if flags & HAS_ATTR_BIT:
                self.read_item()
            tag = self.read_item() if flags & HAS_TAG_BIT else None
            items[str(tag if tag is not None else len(items))] = self.read_item()
            flags = self._int()
            if flags & 0xFF != LISTSXP:
                self.pos -= 4
                self.read_item()  # the terminating NULL
                return items

    def _read_vector(self, sexp_type: int) -> list:
        length = self._int()
        if sexp_type in (STRSXP, VECSXP, EXPRSXP):
            return [self.read_item() for _ in range(length)]
        if sexp_type in (LGLSXP, INTSXP):
            values = struct.unpack_from(f">{length}i", self.data, self.pos)
            self.pos += 4 * length
            return [None if v == NA_INTEGER else v for v in values]
        if sexp_type == REALSXP:
            values = struct.unpack_from(f">{length}d", self.data, self.pos)
            self.pos += 8 * length
            return list(values)
        raise ValueError(f"R object type {sexp_type} is not supported by this reader")


def unserialize(data: bytes) -> object:
    """Decode one R object serialized in XDR format (as written by ``saveRDS``/lazy-load)."""
    reader = _XdrReader(data)
    reader.read_header()
    return reader.read_item()


def read_lazyload_data(data_dir: Path) -> dict[str, object]:
    """Return every data set of an installed R package's ``data/`` folder, by name."""
    index = unserialize(gzip.decompress((data_dir / "Rdata.rdx").read_bytes()))
    database = (data_dir / "Rdata.rdb").read_bytes()
    datasets = {}
    for name, (offset, length) in index["variables"].items():
        record = database[int(offset) : int(offset) + int(length)]
        datasets[name] = unserialize(zlib.decompress(record[4:]))
    return datasets

