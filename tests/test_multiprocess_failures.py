"""One process of a two-process job fails: every process stops within seconds, with a one-line
error and a failure status (manager_jax/distributed.py `exit_on_failure`).

Before, the failing process waited at exit in JAX's shutdown barrier and the others in a
collective or vote: both aborted after 300 s (the shutdown timeout) with C++ stack traces. Each
process here gets its own copy of a directory (as on hosts with local disks), one of them
damaged. Slow: run with `-m slow`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.test_infer_cli import save_tiny_checkpoint
from tests.test_train_multiprocess import COMMON, REPO, TIMEOUT, _env, _free_port, _train_cmd
from manager_jax.reference.parity import random_image

# A stop takes seconds; anything near the runtime's 100 s / 300 s timeouts is the old hang.
STOP_S = 60
# generate: start-up (imports, tokenizer, model build) before the failing restore, then gloo's 30 s
# set-up timeout ends process 0's wait; on a loaded 2-core host that passed 60 s with nothing wrong.
GENERATE_STOP_S = 150


def _start(commands: list[list[str]], devices: int = 4) -> list[subprocess.Popen]:
    port = _free_port()
    return [
        subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=_env(devices, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                             JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)))
        for i, command in enumerate(commands)
    ]


def _finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str, float]]:
    """(status, stderr, seconds) of each process; kills both when one is still running after `timeout`."""
    start, results = time.monotonic(), []
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(1.0, timeout - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"still running {timeout:.0f} s after the failure: {[q.communicate()[1][-1500:] for q in procs]}")
        results.append((p.returncode, err, time.monotonic() - start))
    return results


def _last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


def _damage(params_dir) -> None:
    """Empties the array data files of an Orbax params item (not its metadata): the restore
    itself fails, when it reads the arrays."""
    for root, _, names in os.walk(params_dir):
        if os.path.basename(root) == "d" and os.path.basename(os.path.dirname(root)).startswith("ocdbt.process_"):
            for name in names:
                open(os.path.join(root, name), "w").close()


def _stopped_by_process_1(result, status: int) -> None:
    code, err, _ = result
    assert code == status, err[-3000:]
    assert _last_line(err) == f"error: process 1 of 2 failed (exit status {status}; its log says why); process 0 stops too"


def _stopped_by_process_0_too(result) -> None:
    """Process 0 waited in the restore's collectives: the news of process 1's failure, or its own
    error when the collective lost its peer first; never a claim that its own copy is damaged."""
    code, err, _ = result
    assert code == 2, err[-3000:]
    line = _last_line(err)
    assert (line.startswith("error: process 1 of 2 failed (exit status 2; its log says why)")
            or line.startswith("error: ") and "Gloo" in line), err[-2000:]
    assert "damaged or unreadable" not in err, err[-2000:]


@pytest.mark.slow
def test_a_bad_override_on_one_process_stops_both(tmp_path):
    # Process 1's command line differs (a launch script that builds it per host): it refuses its
    # recipe (2) while process 0 goes on to wait for it in the run-directory vote.
    procs = _start([_train_cmd(f"output_dir={tmp_path}", *COMMON),
                    _train_cmd(f"output_dir={tmp_path}", *COMMON, "num_steps=abc")])
    first, second = _finish(procs, STOP_S)
    assert second[0] == 2 and _last_line(second[1]) == "error: --set num_steps='abc': expected int", second[1][-2000:]
    _stopped_by_process_1(first, 2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-process run's checkpoint of step 1."""
    out = tmp_path_factory.mktemp("trained")
    procs = _start([_train_cmd(f"output_dir={out}", *COMMON, "stop_at_step=1")] * 2)
    outputs = [p.communicate(timeout=TIMEOUT) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in outputs]
    os.remove(out / "train.lock")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("how", ["resume", "init_from"])
def test_a_checkpoint_damaged_on_one_process_stops_both(trained, tmp_path, how):
    """Process 1 fails inside the Orbax restore, after process 0 entered its collectives."""
    copies = [tmp_path / f"host{i}" for i in range(2)]
    for copy in copies:
        shutil.copytree(trained, copy)
    _damage(copies[1] / "checkpoints" / "1" / "params")
    if how == "resume":
        argvs = [_train_cmd(f"output_dir={copy}", *COMMON) for copy in copies]
    else:  # a fresh run starting from the checkpoint's weights
        argvs = [_train_cmd(f"output_dir={tmp_path / 'new'}", *COMMON, f"init_from={copy / 'checkpoints'}")
                 for copy in copies]
    first, second = _finish(_start(argvs), STOP_S)
    assert second[0] == 2, second[1][-3000:]
    assert "Traceback" not in second[1]
    what = "cannot restore step 1 from" if how == "resume" else "init_from"
    line = _last_line(second[1])
    assert line.startswith("error: ") and what in line and str(copies[1]) in line, line
    assert "the checkpoint is damaged or unreadable here" in line and "TensorStore({" not in line, line
    _stopped_by_process_0_too(first)


@pytest.mark.slow
def test_generate_with_a_checkpoint_damaged_on_one_process_stops_both(tmp_path):
    """Past `_agreed`'s checks (the tokenizer, the mesh), the model load itself fails on process 1,
    inside the Orbax restore whose collectives process 0 waits in (until gloo's 30 s set-up timeout)."""
    copies = [save_tiny_checkpoint(str(tmp_path / "ckpt0"))]
    copies.append(shutil.copytree(copies[0], tmp_path / "ckpt1"))
    _damage(copies[1] / "params")
    random_image((90, 70), 11).save(tmp_path / "photo.png")
    commands = [[sys.executable, "run.py", "generate", "--checkpoint", str(ckpt), "--image", str(tmp_path / "photo.png"),
                 "--prompt", "What is it?", "--max-new-tokens", "2", "--json", "--mesh", "fsdp=-1"] for ckpt in copies]
    first, second = _finish(_start(commands, devices=2), GENERATE_STOP_S)
    assert second[0] == 2, second[1][-3000:]
    # (Orbax's reader threads may print "Event loop is closed" tracebacks before it.) One line naming the file that cannot be read (it was TensorStore's multi-line spec dump).
    line = _last_line(second[1])
    assert line.startswith(f"error: cannot read checkpoint {str(copies[1])!r}") and "OCDBT" in line, second[1][-2000:]
    assert line.endswith("the checkpoint is damaged or unreadable here"), line
    _stopped_by_process_0_too(first)
