"""Conversion at the real 0.5B shapes (~1.8 GB bf16 checkpoint on disk): slow, run with -m slow.

Checks the round trip original -> Orbax -> original is bit-identical per tensor, prints the wall
time and peak RSS of each direction (numbers are reported, not asserted), and runs `verify` on the
converted checkpoint against the PyTorch Manager reference (~10 GB of RAM, fp32).
"""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_convert", os.path.join(REPO, "benchmarks", "convert.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_real_05b_round_trip_time_and_memory(tmp_path):
    if shutil.disk_usage(tmp_path).free < 8e9:
        pytest.skip("needs ~6 GB of free disk")
    bench = _bench_module()
    rows = bench.benchmark(str(tmp_path), "grid_manager", num_shards=2, check=True)  # raises on any difference
    print("\n" + bench.format_table(rows))
    assert [r["direction"] for r in rows] == ["original -> Orbax", "Orbax -> original"]
    from tools.convert_weights import verify

    report = verify.verify(str(tmp_path / "original"), str(tmp_path / "orbax"), image_size=(384, 384))
    print(report)
    assert report.relative_error <= 1e-5 and report.top1_agreement == 1.0
