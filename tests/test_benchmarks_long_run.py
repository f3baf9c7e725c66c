"""benchmarks/long_run.py's readings of a process (from /proc) and its memory trend, checked
against a process and metrics made here."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import long_run

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads Linux's /proc")


def test_a_sample_sees_the_files_and_children_the_process_opens(tmp_path):
    out, log = tmp_path / "run", tmp_path / "run.log"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "a").write_bytes(b"x" * 2**20)
    (out / "metrics.jsonl").write_text(json.dumps({"step": 7, "loss": 1.0}) + "\n")
    log.write_text("Finished XLA compilation of jit(f)\nother\nFinished XLA compilation of jit(g)\n")
    before = long_run.sample(os.getpid(), str(out), str(log))
    with open(log) as extra, subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) as child:
        try:
            after = long_run.sample(os.getpid(), str(out), str(log))
        finally:
            child.kill()
    assert extra.closed
    assert after["fds"] >= before["fds"] + 1  # the open log (the child's pipes are not ours)
    assert after["children"] == before["children"] + 1 and after["rss_children_mb"] > 0
    assert before["step"] == 7 and before["compiles"] == 2 and before["checkpoints_mb"] == 1.0


def test_the_memory_trend_is_the_slope_over_the_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "host_rss_gb": 1.0 + 1e-4 * s + (0.05 if s % 5 == 0 else 0.0)})
             for s in range(1, 501)]  # 0.1 MB per step, a saw-tooth every 5 steps
    lines.insert(3, json.dumps({"step": 3, "event": "checkpoint"}))
    path.write_text("\n".join(lines) + "\n")
    # MB per 1,000 steps; the saw-tooth shifts the fit a little
    assert long_run.rss_slope(str(path)) == pytest.approx(100.0, abs=3.0)
