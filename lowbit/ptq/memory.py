"""Peak memory of a run: measured (host RSS, CUDA allocator) and estimated before the run.

Measured host peak: the rise of the process's resident set above its size at the start. On Linux the kernel's
high-water mark ``VmHWM`` (``/proc/self/status``) is first reset to the current RSS by writing ``5`` to
``/proc/self/clear_refs``, so ``peak = VmHWM(end) - VmRSS(start)`` covers exactly the run; RSS counts every
resident page, torch's CPU tensors (plain ``malloc``/``mmap``, no caching allocator) and mapped safetensors
files included. Where the reset is refused, ``resource.getrusage``'s ``ru_maxrss`` (the peak since the process
began) stands in, an upper bound. Measured GPU peak: ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats`` (tensors only, not the allocator's cache or the CUDA context).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import re
import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
KIB = 1024


def status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` in bytes (``VmRSS``: resident now, ``VmHWM``: its peak since the
    last reset); None where there is no such file or field (not Linux)."""
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return None if match is None else int(match.group(1)) * KIB


def release_free_memory() -> None:
    """Collect garbage, then hand the C heap's free pages back to the OS (glibc ``malloc_trim(0)``; a no-op
    elsewhere). glibc keeps freed memory for reuse, so without this a phase's transients (tokenizer buffers,
    activations) would stay resident through the next phase."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Collect once, then keep what is alive out of the collector's scans until the block ends (``gc.freeze``,
    undone by ``gc.unfreeze``). What is alive then is mostly import-time objects (370k after importing torch,
    transformers and lowbit), never garbage; a full collection scans them all (0.3 s on the 2-core CI box) and
    ``release_free_memory`` collects at every phase, so the run's collections shrink to scanning what it made."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _glibc():
    name = ctypes.util.find_library("c")
    try:
        library = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return library if library is not None and hasattr(library, "malloc_trim") else None


_LIBC = _glibc()


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD = 1024 * 1024  # measured on the bundled model: 128 KiB (glibc's default) cost AWQ 2.2x CPU time


def return_large_frees() -> bool:
    """Fix glibc's mmap threshold at 1 MiB (setting it switches off glibc's dynamic raise after the first large
    free, up to 32 MiB), so every tensor of 1 MiB or more gets its own mapping and goes back to the OS when
    freed instead of staying in the heap: peak resident memory then follows live memory. Smaller blocks still
    come from the heap (mapping each costs page faults: at 128 KiB AWQ took 2.2x the CPU time, at 1 MiB no
    measurable change). False where there is no glibc. Process-wide and permanent: the CLI calls it."""
    return _LIBC is not None and bool(_LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def resident_bytes() -> int | None:
    """The process's resident set now (Linux ``VmRSS``), None where unknown."""
    return status_bytes("VmRSS")


class PeakMemory:
    """Host and GPU peak over a run: ``start()`` at its beginning, ``phase(name)`` at the end of each phase,
    then ``host_peak()`` (the highest over all phases) and ``phases`` ({name: host peak in that phase})."""

    def __init__(self) -> None:
        self.start_rss: int | None = None
        self.exact = False  # True: VmHWM is reset at each phase start
        self.phases: dict[str, int | None] = {}
        self.after: dict[str, int | None] = {}  # resident set above the start once the phase's garbage is freed

    def start(self) -> None:
        release_free_memory()
        self.start_rss = resident_bytes()
        self.exact = self._reset()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    @staticmethod
    def _reset() -> bool:
        try:
            CLEAR_REFS.write_text("5")
        except OSError:
            return False
        return True

    @property
    def method(self) -> str:
        if self.exact:
            return "VmHWM - VmRSS at start (/proc/self/status; VmHWM reset through /proc/self/clear_refs per phase)"
        return "ru_maxrss - VmRSS at start (peak since process start: an upper bound)"

    def _peak_now(self) -> int | None:
        if self.start_rss is None:
            return None
        if self.exact:
            peak_bytes = status_bytes("VmHWM")
        else:
            scale = 1 if sys.platform == "darwin" else KIB  # ru_maxrss: bytes on macOS, KiB on Linux
            peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        return None if peak_bytes is None else max(0, peak_bytes - self.start_rss)

    def phase(self, name: str) -> None:
        """Record the peak of the phase that ends now, release free memory, and start the next one's."""
        self.phases[name] = self._peak_now()
        release_free_memory()
        now = resident_bytes()
        self.after[name] = None if now is None or self.start_rss is None else now - self.start_rss
        if self.exact:
            self._reset()

    def host_peak(self) -> int | None:
        """Bytes of the resident-set rise at its highest since ``start()``; None where not measurable."""
        peaks = [p for p in (*self.phases.values(), self._peak_now()) if p is not None]
        return max(peaks) if peaks else None

    @staticmethod
    def gpu_peak() -> int | None:
        return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
