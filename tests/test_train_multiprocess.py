"""`run.py train` as users run it: the demo end to end, and two processes with jax.distributed.

All are slow (several fresh processes that each compile the step); run them with `-m slow`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from manager_jax.train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 900


def _env(devices: int, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    # One process: the session's compilation cache (tests/conftest.py), not the user's. Several: run.py's
    # default, no cache (manager_jax/platform.py says why; these tests broke with one).
    if int(extra.get("JAX_NUM_PROCESSES", "1")) == 1:
        env["JAX_COMPILATION_CACHE_DIR"] = os.environ.get("JAX_COMPILATION_CACHE_DIR", "")
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)
    return env


def _train_cmd(*overrides: str) -> list[str]:
    cmd = [sys.executable, "run.py", "train", "--config", "configs/demo.py"]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


@pytest.mark.slow
def test_demo_trains_then_generates(tmp_path):
    out = subprocess.run(_train_cmd(f"output_dir={tmp_path}"), cwd=REPO, env=_env(1), capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr[-3000:]
    match = re.search(r"first loss ([\d.]+)\s+final loss ([\d.]+)", out.stdout)
    assert match, out.stdout
    first, final = map(float, match.groups())
    print(f"demo: first loss {first:.4f}, final loss {final:.4f}")
    assert final < first - 2.0  # clearly below the start
    ckpt = tmp_path / "checkpoints"
    assert (ckpt / "config.json").exists() and (ckpt / "40" / "params").is_dir()
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(1, 41))
    assert any((tmp_path / "tensorboard").iterdir())
    image = sorted((tmp_path / "data" / "images").iterdir())[0]
    gen = subprocess.run(
        [sys.executable, "run.py", "generate", "--checkpoint", str(ckpt), "--image", str(image),
         "--prompt", "What colour is the shape?", "--max-new-tokens", "4", "--json"],
        cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert gen.returncode == 0, gen.stderr[-3000:]
    result = json.loads(gen.stdout.strip().splitlines()[-1])
    assert len(result["token_ids"]) >= 1
    assert "Metadata file does not exist" not in gen.stderr  # Orbax's noise about an item of a training step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


COMMON = (
    "num_steps=4", "synthetic_records=40", "data.seq_len=832", "batch_shards=8", "mesh.fsdp=-1",
    "checkpoint.every_steps=0", "logging.progress_bar=False", "logging.tensorboard=False",
)


def _start_two_processes(output_dir, *overrides: str) -> list[subprocess.Popen]:
    port = _free_port()
    return [
        subprocess.Popen(
            _train_cmd(f"output_dir={output_dir}", *COMMON, *overrides), cwd=REPO,
            env=_env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]


def _two_processes(output_dir, *overrides: str) -> None:
    """Runs both processes to the end."""
    procs = _start_two_processes(output_dir, *overrides)
    outputs = [p.communicate(timeout=TIMEOUT) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]


def _eval_events(directory) -> list[dict]:
    with open(directory / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if r.get("event") == "eval"]


# A held-out set of 11 records over the 8 shards: process 1's shards (4-7, one record each) run out
# before process 0's, and it evaluates empty batches while process 0 finishes.
HELD_OUT = ("eval.synthetic_records=11", "eval.every_steps=2")


@pytest.mark.slow
def test_two_processes_with_resume_match_one_process(tmp_path):
    # Two processes x 4 devices: steps 1-2, stop (checkpoint), then a new pair resumes for 3-4.
    _two_processes(tmp_path / "mp", "stop_at_step=2", *HELD_OUT)
    assert [r["step"] for r in read_metrics(str(tmp_path / "mp" / "metrics.jsonl"))] == [1, 2]
    _two_processes(tmp_path / "mp", *HELD_OUT)
    # One process with the same 8 devices and 8 data shards.
    single = subprocess.run(_train_cmd(f"output_dir={tmp_path / 'sp'}", *COMMON, *HELD_OUT), cwd=REPO, env=_env(8),
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert single.returncode == 0, single.stderr[-3000:]
    mp = read_metrics(str(tmp_path / "mp" / "metrics.jsonl"))
    sp = read_metrics(str(tmp_path / "sp" / "metrics.jsonl"))
    assert [r["step"] for r in mp] == [1, 2, 3, 4] == [r["step"] for r in sp]
    for a, b in zip(mp, sp):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["samples"] == b["samples"] and a["supervised_tokens"] == b["supervised_tokens"]
    mp_eval, sp_eval = _eval_events(tmp_path / "mp"), _eval_events(tmp_path / "sp")
    assert [e["step"] for e in mp_eval] == [2, 4] == [e["step"] for e in sp_eval]
    for a, b in zip(mp_eval, sp_eval):
        assert a["samples"] == b["samples"] == 11 and a["tokens"] == b["tokens"] > 0
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_after_the_same_step(tmp_path):
    # A preemption notice reaches the hosts of a job at different times: here only process 1 gets
    # SIGTERM. The per-step vote makes both stop after the same step and save that checkpoint.
    procs = _start_two_processes(tmp_path, "num_steps=20", "synthetic_records=160")
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT
    while not (metrics.exists() and read_metrics(str(metrics))):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no step finished"
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=TIMEOUT) for p in procs]
    for p, (out, err) in zip(procs, outputs):  # both exit 143 (SIGTERM's), the one not signalled too
        assert p.returncode == 128 + signal.SIGTERM, err[-3000:]
        assert "stopped by SIGTERM after step" in out, out
    ends = [re.search(r"\(steps 1\.\.(\d+), (\w+)\)", out) for out, _ in outputs]
    assert all(ends), outputs
    (last, status), (last_1, status_1) = (m.groups() for m in ends)
    assert status == status_1 == "stopped" and last == last_1 and int(last) < 20
    assert (tmp_path / "checkpoints" / last / "params").is_dir()
    assert [r["step"] for r in read_metrics(str(metrics))] == list(range(1, int(last) + 1))


@pytest.mark.slow
def test_too_many_bad_records_on_one_process_stop_both(tmp_path):
    # Unshuffled, shard k reads records k, k + 8, ...: the image files of shards 0-3 are missing,
    # so only the process holding those shards is over data.max_skip_fraction. Both must stop.
    from manager_jax.data.records import write_records
    from manager_jax.data.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(str(tmp_path / "data"), num_records=160, seed=0, sizes=[(384, 384)])
    records = [dict(r, image="images/gone.jpg") if "image" in r and i % 8 < 4 else r for i, r in enumerate(data.records)]
    write_records(str(tmp_path / "records.json"), records)
    procs = _start_two_processes(
        tmp_path / "run", "synthetic_records=None", f"data.data_path={tmp_path / 'records.json'}",
        f"data.image_folder={data.image_folder}", "data.shuffle=False", "data.skip_check_after=20", "num_steps=20",
    )
    outputs = [p.communicate(timeout=TIMEOUT) for p in procs]
    assert [p.returncode for p in procs] == [1, 1], [err[-3000:] for _, err in outputs]
    errors = sorted(err.strip().splitlines()[-1] for _, err in outputs)
    assert errors[0].startswith("error: ") and "were skipped as bad, more than data.max_skip_fraction=0.5: missing_image" in errors[0]
    assert "images/gone.jpg" in errors[0]
    assert errors[1] == ("error: another process skipped more than data.max_skip_fraction=0.5 of its records as bad; "
                         "its error names them")
