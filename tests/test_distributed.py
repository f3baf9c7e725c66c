"""Multi-process start-up from the environment (manager_jax/distributed.py): a wrong JAX_* variable
is one `error:` line and status 2 from every command, before anything is started or written."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import run  # noqa: E402

BAD_ENVS = [
    ({"JAX_NUM_PROCESSES": "2"}, "JAX_PROCESS_ID is not"),
    ({"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES='two' must be an integer"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, r"JAX_PROCESS_ID=2 must be in 0\.\.1"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0", "JAX_LOCAL_DEVICE_IDS": "0,x"}, "comma-separated integers"),
    # Without the count, each host would start alone as process 0 of 1 and train on its own.
    ({"JAX_PROCESS_ID": "1"}, "JAX_NUM_PROCESSES is not"),
    ({}, "JAX_NUM_PROCESSES is not"),
]


@pytest.mark.parametrize("env, message", BAD_ENVS)
def test_bad_process_variables_are_refused_before_start_up(env, message, monkeypatch):
    from manager_jax import distributed

    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")  # nothing listens: never reached
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(distributed.DistributedSetupError, match=message):
        distributed.initialize()


@pytest.mark.parametrize("command", [["train", "--config", "configs/demo.py"],
                                     ["generate", "--checkpoint", "no_such_dir", "--prompt", "hi"]])
def test_commands_report_them_in_one_line_with_status_2(command, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "7")
    out = tmp_path / "run"
    extra = ["--set", f"output_dir={out}"] if command[0] == "train" else []
    assert run.main(command + extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: JAX_PROCESS_ID=7 must be in 0..1") and "\n" not in err, err
    assert not out.exists()


def test_an_unreachable_coordinator_is_a_clear_error_after_the_timeout(monkeypatch):
    """Without the wait, process 1 aborted after JAX's 300 s with a C++ stack trace blaming a dead task."""
    import socket
    import time

    from manager_jax import distributed

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                        "JAX_PROCESS_ID": "1"}.items():
        monkeypatch.setenv(name, value)
    start = time.monotonic()
    with pytest.raises(distributed.DistributedSetupError, match=f"coordinator at 127.0.0.1:{port} did not answer within 2 s"):
        distributed.initialize(timeout_s=2)
    assert time.monotonic() - start < 10
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "no-port-here")
    with pytest.raises(distributed.DistributedSetupError, match="must be host:port"):
        distributed.initialize(timeout_s=2)
