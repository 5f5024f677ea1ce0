"""Peak-memory and timing helpers shared by eval, recovery and the benchmarks.

On CUDA the peak comes from the caching allocator; on CPU a background thread samples
the process's resident set size (``/proc/self/statm``) every few milliseconds, and the
reported number is the peak *above* the resident size when measuring started (the
"extra peak" that the Liger-Kernel benchmarks quote).
"""

from __future__ import annotations

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


class PeakMemory:
    """Context manager measuring extra peak memory of the block, in bytes.

    Attributes:
        peak: peak bytes above the level at entry (after the block).
        device: ``cuda`` or ``cpu``.
    """

    def __init__(self, device: str | torch.device = "cpu", interval_s: float = 0.002):
        self.device = torch.device(device).type
        self.interval_s = interval_s
        self.peak = 0

    def __enter__(self) -> "PeakMemory":
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._base = rss_bytes()
            self._max = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, rss_bytes())
            time.sleep(self.interval_s)

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
        else:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, rss_bytes())
            self.peak = self._max - self._base


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
