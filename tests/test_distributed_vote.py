"""manager_jax.distributed.any_process across two real processes (jax.distributed, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.test_train_multiprocess import REPO, _env, _free_port


def test_two_processes_vote_without_waiting_for_their_devices():
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.distributed_vote_worker"], cwd=REPO,
            env=_env(1, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    expected = [
        [any((r + p) % 3 == 0 for p in (0, 1)), any((r + p + 1) % 3 == 0 for p in (0, 1)), True] for r in range(6)
    ]
    for report in reports:
        assert report["results"] == expected
        # The vote came back while seconds of work were still queued on the process's device.
        assert report["waited_for_device"] is False
        # The 109 rounds left only the keys of the last two (each process deletes its key of the
        # round before once it has passed the barrier of the next).
        rounds_left = {int(k.split("/")[-2]) for k in report["keys_left"]}
        assert rounds_left <= {107, 108} and {f"manager_jax/any_process/108/{p}" for p in (0, 1)} <= set(report["keys_left"])


@pytest.mark.parametrize("failing", [0, 1])
def test_a_failing_process_stops_the_other_where_it_waits(failing):
    """The failing process (0 hosts the coordination service) exits at once with its status, the
    other with the same status and a one-line message, not after the vote's hour or JAX's 300 s
    shutdown barrier."""
    port = _free_port()
    start = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.distributed_failure_worker", str(failing)], cwd=REPO,
            env=_env(1, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert time.monotonic() - start < 40
    assert [p.returncode for p in procs] == [2, 2], [err[-2000:] for _, err in outputs]
    errors = [err.strip().splitlines()[-1] for _, err in outputs]
    other = 1 - failing
    assert errors[failing] == "error: this process's own error"
    assert errors[other] == f"error: process {failing} of 2 failed (exit status 2; its log says why); process {other} stops too"
