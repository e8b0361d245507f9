"""Progress bars of lowbit's long loops (tqdm, with its rate and ETA), and one switch that hides them all:
``with progress_bars(False):`` (``lowbit ptq --no-progress``). Loops that take a ``progress`` argument of their own
(calibration batches, perplexity windows) are hidden by either."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from tqdm.auto import tqdm

_SHOWN: ContextVar[bool] = ContextVar("lowbit_progress_bars", default=True)


@contextmanager
def progress_bars(shown: bool) -> Iterator[None]:
    """Show (``True``) or hide (``False``) the bars of ``progress`` within the block."""
    token = _SHOWN.set(shown)
    try:
        yield
    finally:
        _SHOWN.reset(token)


def progress(iterable: Iterable | None = None, *, disable: bool = False, **options) -> tqdm:
    """``tqdm(iterable, **options)`` (a manual bar with ``total=`` where ``iterable`` is None), hidden where
    ``disable`` or inside ``progress_bars(False)``."""
    return tqdm(iterable, disable=disable or not _SHOWN.get(), **options)
