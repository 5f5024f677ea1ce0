"""Peak-memory sampling (``minicompress.measure``)."""

import time

import pytest
import torch

from minicompress.measure import PeakMemory, heap_bytes, rss_bytes

MIB = 1024**2


@pytest.mark.parametrize("source", ["rss", "heap"])
def test_peak_sees_a_short_lived_tensor(source):
    with PeakMemory("cpu", interval_s=0.001, source=source) as mem:
        x = torch.ones(64 * MIB // 4)  # 64 MiB, touched
        time.sleep(0.05)
        del x
    assert 60 * MIB <= mem.peak <= 200 * MIB
    assert mem.source in ("rss", "heap")


def test_heap_counter_tracks_live_bytes():
    if heap_bytes() is None:
        pytest.skip("glibc mallinfo2 unavailable")
    before = heap_bytes()
    x = torch.empty(32 * MIB // 4)
    during = heap_bytes()
    del x
    after = heap_bytes()
    assert during - before >= 32 * MIB
    assert after - before < 8 * MIB  # freed memory leaves the heap counter (RSS may keep it)
    assert rss_bytes() > 0


def test_unknown_source_is_refused():
    with pytest.raises(ValueError, match="source"):
        PeakMemory("cpu", source="vms")
