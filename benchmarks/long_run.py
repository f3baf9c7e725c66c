"""Resource use of a long `run.py train`: does anything grow with the number of steps?

    python benchmarks/long_run.py --out runs/long [--every 2] [-- --set num_steps=2000 --set data.worker_count=2 ...]

Launches `run.py train --config configs/demo.py` (with the arguments after `--`) in a subprocess
with JAX_LOG_COMPILES=1 and samples it every --every seconds from /proc (Linux only): resident
memory, threads, open file descriptors, processes under it (Grain workers), the size of its
output_dir, the last step in metrics.jsonl and the XLA compilations logged so far. Prints one JSON
line per sample and a last line with the first and last sample after the first checkpoint and
their difference per 1,000 steps. After the first steps (compilation, first checkpoint) every
column but the step and the disk use of the data folder should stay flat: a per-step growth is a
leak.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEFAULTS = [
    # The demo, on one device, a checkpoint every 5 steps (keep 2), metrics + TensorBoard every step.
    "num_steps=2000", "data.seq_len=832", "synthetic_records=64", "checkpoint.every_steps=5", "checkpoint.keep=2",
    "logging.every_steps=1", "logging.tensorboard=True", "logging.progress_bar=False", "mesh.num_devices=1",
    "loss_token_budget=96",
]


def _status(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "Threads"):
                out[key] = int(value.split()[0])
    return out


def _child_rss_kb(pid: int) -> int:
    try:
        return _status(pid).get("VmRSS", 0)
    except OSError:  # it ended since it was listed
        return 0


def _children(pid: int) -> list[int]:
    """Every process below `pid` (Grain workers and their helpers)."""
    parents: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _du(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _last_step(metrics_path: str) -> int | None:
    try:
        with open(metrics_path, "rb") as f:
            f.seek(max(0, os.path.getsize(metrics_path) - 4096))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


def sample(pid: int, out: str, log_path: str) -> dict:
    status = _status(pid)
    children = _children(pid)
    with open(log_path, errors="replace") as f:
        compiles = sum("Finished XLA compilation" in line for line in f)
    return {
        "t_s": None,
        "step": _last_step(os.path.join(out, "metrics.jsonl")),
        "rss_mb": round(status["VmRSS"] / 1024, 1),
        "rss_children_mb": round(sum(_child_rss_kb(c) for c in children) / 1024, 1),
        "threads": status["Threads"],
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "children": len(children),
        "checkpoints_mb": round(_du(os.path.join(out, "checkpoints")) / 2**20, 2),
        "tensorboard_mb": round(_du(os.path.join(out, "tensorboard")) / 2**20, 3),
        "metrics_mb": round(_du(os.path.join(out, "metrics.jsonl")) / 2**20, 3),
        "compiles": compiles,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output_dir of the run")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--config", default=os.path.join(REPO, "configs", "demo.py"))
    parser.add_argument("overrides", nargs="*", help="more --set values (after --), e.g. data.worker_count=2")
    args = parser.parse_args()
    sets = [f"output_dir={args.out}", *DEFAULTS, *args.overrides]
    command = [sys.executable, os.path.join(REPO, "run.py"), "train", "--config", args.config]
    for value in sets:
        command += ["--set", value]
    log_path = args.out.rstrip("/") + ".log"
    env = {**os.environ, "JAX_LOG_COMPILES": "1"}
    start = time.time()
    samples = []
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            while proc.poll() is None:
                time.sleep(args.every)
                try:
                    row = sample(proc.pid, args.out, log_path)
                except (OSError, KeyError):  # the run ended between poll and sample
                    break
                row["t_s"] = round(time.time() - start, 1)
                samples.append(row)
                print(json.dumps(row), flush=True)
        finally:
            if proc.poll() is None:
                proc.terminate()
            proc.wait()
    # From the first sample past the first checkpoints (compiled, Orbax's threads started).
    settled = [s for s in samples if (s["step"] or 0) >= 20]
    summary = {"exit_status": proc.returncode, "log": log_path}
    if len(settled) >= 2:
        a, b = settled[0], settled[-1]
        steps = (b["step"] - a["step"]) or 1
        summary.update(first=a, last=b, per_1000_steps={
            k: round((b[k] - a[k]) * 1000 / steps, 3) for k in a if k not in ("t_s", "step")})
    fit = rss_slope(os.path.join(args.out, "metrics.jsonl"))
    if fit is not None:
        summary["host_rss_mb_per_1000_steps_fit"] = fit
    print(json.dumps(summary))
    return proc.returncode


def rss_slope(metrics_path: str, after_step: int = 20) -> float | None:
    """Least-squares slope of metrics.jsonl's host_rss_gb over the steps after `after_step`, in MB
    per 1,000 steps: every step's value, so the saw-tooth of the checkpoint saves averages out."""
    points = []
    try:
        with open(metrics_path) as f:
            for line in f:
                record = json.loads(line)
                if record.get("host_rss_gb") is not None and record["step"] > after_step:
                    points.append((record["step"], record["host_rss_gb"] * 1e3))
    except (OSError, ValueError):
        return None
    if len(points) < 2:
        return None
    n = len(points)
    mean_x, mean_y = sum(p[0] for p in points) / n, sum(p[1] for p in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    return round(1000 * sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx, 2) if sxx else None


if __name__ == "__main__":
    sys.exit(main())
