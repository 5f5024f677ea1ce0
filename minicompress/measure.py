"""Peak-memory and timing helpers shared by eval, recovery and the benchmarks.

On CUDA the peak comes from the caching allocator; on CPU a background thread samples
either the process's resident set size (``/proc/self/statm``) or, with ``source="heap"``,
the bytes glibc's ``malloc`` has handed out and not taken back (``mallinfo2``: arena
bytes in use + mmapped blocks), the CPU analogue of ``torch.cuda.memory_allocated``.
The reported number is the peak *above* the level when measuring started (the "extra
peak" that the Liger-Kernel benchmarks quote). RSS also counts freed memory that glibc
keeps for reuse, so after one large step it stops moving; the heap counter does not have
that blind spot and needs no ``MALLOC_MMAP_THRESHOLD_`` tuning (which made every step
here up to 1.5x slower by page-faulting each large tensor afresh).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Current resident set size of this process in bytes (0 where /proc is absent)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _load_libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _load_mallinfo2(libc):
    fn = getattr(libc, "mallinfo2", None) if libc is not None else None  # glibc >= 2.33
    if fn is not None:
        fn.restype = _MallInfo2
    return fn


_LIBC = _load_libc()
_MALLINFO2 = _load_mallinfo2(_LIBC)


def release_free_heap() -> None:
    """Hand glibc's free heap pages back to the OS (``malloc_trim(0)``; no-op elsewhere), so
    memory freed earlier is not still resident when the next measurement starts."""
    trim = getattr(_LIBC, "malloc_trim", None) if _LIBC is not None else None
    if trim is not None:
        trim(0)


def heap_bytes() -> int | None:
    """Bytes allocated through glibc ``malloc`` and not yet freed (None without glibc 2.33+)."""
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return int(info.uordblks + info.hblkhd)


class PeakMemory:
    """Context manager measuring extra peak memory of the block, in bytes.

    Args:
        device: ``cuda`` or ``cpu``.
        interval_s: CPU sampling period.
        source: CPU counter, ``rss`` or ``heap`` (falls back to ``rss`` without glibc 2.33+).

    Attributes:
        peak: peak bytes above the level at entry (after the block).
        device: ``cuda`` or ``cpu``.
        source: the CPU counter actually used.
    """

    def __init__(self, device: str | torch.device = "cpu", interval_s: float = 0.002, source: str = "rss"):
        if source not in ("rss", "heap"):
            raise ValueError(f"source: {source!r} is not one of rss, heap")
        self.device = torch.device(device).type
        self.interval_s = interval_s
        self.source = "heap" if source == "heap" and _MALLINFO2 is not None else "rss"
        self._read = heap_bytes if self.source == "heap" else rss_bytes
        self.peak = 0

    def __enter__(self) -> "PeakMemory":
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._base = self._read()
            self._max = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, self._read())
            time.sleep(self.interval_s)

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
        else:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, self._read())
            self.peak = self._max - self._base


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
