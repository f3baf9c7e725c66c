"""Per-step metric records: the memory each logged step reports."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap

import numpy as np

from manager_jax.train.metrics import memory_record, read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


# TensorBoard's events fill a disk before metrics.jsonl (a file size limit stands in for the full
# disk: 20 scalars take ~1 KB a step as events, ~300 bytes as a JSON line).
_TENSORBOARD_DISK_FULL = textwrap.dedent("""
    import resource, signal, sys
    from manager_jax.train.metrics import MetricsWriter
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    writer = MetricsWriter(sys.argv[1], tensorboard=True)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
    for step in range(1, 51):
        writer.write(step, {f"m{i}": float(step + i) for i in range(20)})
    writer.close()
    print("done")
""")


def test_a_tensorboard_writer_that_fails_warns_once_and_the_run_goes_on(tmp_path):
    """tensorboardX's writer thread died on the full disk and its queue then blocked the next
    add_scalar for ever: the run hung."""
    proc = subprocess.run([sys.executable, "-c", _TENSORBOARD_DISK_FULL, str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "done\n", proc.stderr[-2000:]
    assert proc.stderr.count("TensorBoard logging is off: writing its events failed (File too large (EFBIG))") == 1
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert [r["step"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))] == list(range(1, 51))
    events = os.listdir(tmp_path / "tensorboard")
    assert len(events) == 1 and os.path.getsize(tmp_path / "tensorboard" / events[0]) <= 20_000


_METRICS_DISK_FULL = textwrap.dedent("""
    import resource, signal, sys
    from manager_jax.train.metrics import MetricsWriter
    from manager_jax.train.run_files import WriteFailed
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    writer = MetricsWriter(sys.argv[1], tensorboard=False)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2_000, 2_000))
    try:
        for step in range(1, 51):
            writer.write(step, {"loss": 1.0, "grad_norm": 2.0})
    except WriteFailed as err:
        print(f"step {step}: {err}")
""")


def test_metrics_jsonl_on_a_full_disk_is_an_error_naming_the_file_and_the_cause(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _METRICS_DISK_FULL, str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.endswith(f"writing {tmp_path / 'metrics.jsonl'} failed: File too large (EFBIG)\n"), proc.stdout
    assert int(proc.stdout.split()[1].rstrip(":")) > 1  # the first records were written


class _FlakyWandb:
    """The part of the wandb package MetricsWriter calls, failing as a lost login / network /
    backend process makes it fail: `init` raises, or `log` raises from its `fail_at`-th call on."""

    def __init__(self, init_fails: bool = False, fail_at: int | None = None):
        self.init_fails, self.fail_at, self.logged, self.finished = init_fails, fail_at, [], False

    def init(self, **kwargs):
        if self.init_fails:
            raise RuntimeError("api_key not configured (no-tty)")
        return self

    def log(self, data, step):
        if self.fail_at is not None and len(self.logged) + 1 >= self.fail_at:
            raise OSError("The wandb backend process has shutdown")
        self.logged.append(step)

    def finish(self):
        self.finished = True


def test_a_failing_wandb_warns_once_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    """wandb asked for but unreachable at the start, or dying mid-run: one warning, wandb off,
    every record still in metrics.jsonl (a run of days is not stopped by its dashboard)."""
    from manager_jax.train.metrics import MetricsWriter

    for name, fake in (("init", _FlakyWandb(init_fails=True)), ("log", _FlakyWandb(fail_at=3))):
        monkeypatch.setitem(sys.modules, "wandb", fake)
        out = tmp_path / name
        caplog.clear()
        with caplog.at_level("WARNING"):
            writer = MetricsWriter(str(out), tensorboard=False, wandb=True)
            for step in range(1, 7):
                writer.write(step, {"loss": 1.0 / step})
            writer.close()
        warnings = [r.getMessage() for r in caplog.records if "wandb" in r.getMessage()]
        assert len(warnings) == 1 and f"wandb.{name} failed" in warnings[0], warnings
        assert [r["step"] for r in read_metrics(str(out / "metrics.jsonl"))] == [1, 2, 3, 4, 5, 6]
        assert fake.logged == ([] if name == "init" else [1, 2]) and not fake.finished
