"""Per-step metric records: the memory each logged step reports."""

from __future__ import annotations

import gc

import numpy as np

from manager_jax.train.metrics import memory_record


class _Device:
    """A device as jax reports accelerator memory (CPU devices report none)."""

    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        return self.stats


def test_host_rss_follows_what_the_process_holds():
    before = memory_record()["host_rss_gb"]
    block = np.ones(300_000_000 // 8)  # 300 MB, every page written
    held = memory_record()["host_rss_gb"]
    del block
    gc.collect()
    after = memory_record()["host_rss_gb"]
    assert 0.27 < held - before < 0.35, (before, held)
    assert held - after > 0.25, (held, after)


def test_device_memory_is_reported_when_the_backend_has_it():
    stats = {"bytes_in_use": 3_500_000_000, "peak_bytes_in_use": 7_000_000_000}
    record = memory_record(_Device(stats))
    assert (record["device_memory_gb"], record["device_peak_memory_gb"]) == (3.5, 7.0)
    for missing in (None, {}):
        record = memory_record(_Device(missing))
        assert "device_memory_gb" not in record and record["host_rss_gb"] > 0
