"""run.py: subcommand dispatch and lazy imports with clear errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import run  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_unknown_command_is_an_error(capsys):
    assert run.main(["bogus"]) == 2
    assert "unknown command 'bogus'" in capsys.readouterr().err


def test_help_lists_every_command(capsys):
    assert run.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("train", "compile", "inspect-data", "generate", "score"):
        assert name in out


def test_missing_module_gives_a_clear_message():
    with pytest.raises(SystemExit, match="needs manager_jax.no_such_part, which cannot be imported"):
        run._lazy("manager_jax.no_such_part", "main")
    with pytest.raises(SystemExit, match="has no entry function nothing_here"):
        run._lazy("manager_jax.config", "nothing_here")


def test_dispatch_reaches_the_other_parts():
    assert run.COMMANDS["inspect-data"][0]().__module__ == "manager_jax.data.inspect"
    assert run.COMMANDS["generate"][0]().__name__ == "generate_main"
    assert run.COMMANDS["score"][0]().__name__ == "score_main"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", "configs/no_such_recipe.py"], "error: config file not found: configs/no_such_recipe.py"),
        (["--set", "optim.lrr=1"], "error: --set optim.lrr: optim has no field 'lrr'"),
        (["--set", "logging.every_steps=0"], "logging.every_steps must be >= 1"),
        (["--set", "synthetic_records=None", "--set", "data.data_path=/no/such.jsonl"],
         "data.data_path: /no/such.jsonl: not found"),
        (["--set", "mesh.data=64"], "error: "),  # ShardingError: more devices than there are
        (["--set", "optim.schedule=linear"], "optim.schedule must be one of ('cosine', 'constant')"),
        (["--set", "optim.manager_lr=-1e-4", "--set", "optim.b2=1.0"], "optim.manager_lr must be a finite number >= 0"),
    ],
)
def test_train_input_errors_are_one_line_with_status_2(args, message, tmp_path, capsys):
    assert run.main(["train", "--set", f"output_dir={tmp_path}/run", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "run")  # refused before anything was written


def test_compile_refuses_an_unwritable_hlo_out_before_compiling(tmp_path, capsys):
    for path in (tmp_path / "no_such_folder" / "step.hlo", tmp_path):  # a missing folder; a folder
        with pytest.raises(SystemExit) as exit_:
            run.main(["compile", "--topology", "cpu:1", "--hlo-out", str(path)])
        assert exit_.value.code == 2 and "error: --hlo-out" in capsys.readouterr().err


def test_debug_log_level_adds_the_traceback(capsys):
    assert run.main(["train", "--log-level", "DEBUG", "--config", "configs/no_such_recipe.py"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("error: config file not found: configs/no_such_recipe.py")


@pytest.mark.parametrize("command", ["train", "compile"])
def test_an_attention_kernel_the_target_lacks_is_refused_in_one_line(capsys, tmp_path, command):
    """cuDNN's kernel on a CPU target: one line naming the choices, exit 2, nothing written (a
    traceback from inside the step's tracing, "cuDNN is not detected", exit 1)."""
    extra = ["--topology", "cpu"] if command == "compile" else []
    out = tmp_path / "run"
    assert run.main([command, "--config", "configs/demo.py", "--set", "model.attention_impl=cudnn",
                     "--set", f"output_dir={out}", *extra]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == ("error: model.attention_impl='cudnn' is cuDNN's GPU kernel and the target "
                                            "is cpu: use 'auto' (cuDNN on GPU, Splash on TPU, XLA elsewhere) or 'xla'")
    assert "Traceback" not in err and not out.exists()


def test_a_misspelt_log_level_is_a_usage_error(capsys):
    """It was taken as INFO without a word."""
    with pytest.raises(SystemExit) as exit_:
        run.main(["train", "--log-level", "DEBGU", "--config", "configs/demo.py"])
    assert exit_.value.code == 2 and "'DEBGU' is not one of DEBUG, INFO" in capsys.readouterr().err
    assert run.main(["train", "--log-level", "debug", "--config", "configs/no_such_recipe.py"]) == 2  # any case
    assert "Traceback" in capsys.readouterr().err


def test_a_compile_failure_is_one_error_line_and_its_traceback_with_debug(capsys):
    """What `run.py compile` prints for a program XLA fails to compile (not for lack of memory)."""
    import jax

    from manager_jax.train.aot import AotError, compile_or_refusal
    from tests.test_train_aot import unregistered_ffi_call

    def compile_fails() -> int:
        compile_or_refusal(unregistered_ffi_call().compile, "the test program", "cpu:1", jax.devices("cpu")[:1])
        return 0

    assert run._reporting_errors(compile_fails, "INFO", bad_input=(AotError,)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: compiling the test program for cpu:1") and "Traceback" not in err
    assert "manager_jax_test_no_such_target" in err and "--log-level DEBUG" in err
    assert run._reporting_errors(compile_fails, "DEBUG", bad_input=(AotError,)) == 2
    assert "Traceback" in capsys.readouterr().err


def test_a_failed_run_exits_1_and_ctrl_c_130(capsys):
    from manager_jax.train.loop import TrainingError

    def fails():
        raise TrainingError("3 non-finite steps in a row")

    def interrupted():
        raise KeyboardInterrupt

    assert run._reporting_errors(fails, "INFO", bad_input=(ValueError,), failed=(TrainingError,)) == 1
    assert capsys.readouterr().err == "error: 3 non-finite steps in a row\n"
    assert run._reporting_errors(interrupted, "INFO", bad_input=(ValueError,)) == 130
    assert capsys.readouterr().err == "error: interrupted\n"
    with pytest.raises(ZeroDivisionError):  # a bug is not an input error: its traceback stays
        run._reporting_errors(lambda: 1 // 0, "INFO", bad_input=(ValueError,))


def _train_cmd(output_dir) -> list[str]:
    sets = [f"output_dir={output_dir}", "num_steps=16", "synthetic_records=40", "data.seq_len=832",
            "checkpoint.every_steps=2", "checkpoint.keep=2", "logging.progress_bar=False", "logging.tensorboard=False",
            "mesh.fsdp=1", "mesh.num_devices=1", "batch_shards=1", "loss_token_budget=96"]
    return [sys.executable, "run.py", "train", "--config", "configs/demo.py", *[a for s in sets for a in ("--set", s)]]


def _records(output_dir) -> list[dict]:
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().splitlines()
    return [json.loads(line) for line in lines[:-1]]  # the last line may be cut short while it is written


def _wait_for(condition, proc, timeout=300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended (or hung) before the moment waited for"
        time.sleep(0.02)


@pytest.mark.slow
def test_a_run_killed_during_a_save_resumes_exactly_and_a_second_launch_is_refused(tmp_path):
    """kill -9 of `run.py train` while a checkpoint is written in the background (a preempted
    host), then a relaunch: it resumes from the newest complete checkpoint, with the losses of an
    uninterrupted run, each step once in metrics.jsonl. A launch while the run lives is refused."""
    straight = subprocess.run(_train_cmd(tmp_path / "straight"), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    expected = [(r["step"], r["loss"]) for r in _records(tmp_path / "straight") + [{}] if "loss" in r]
    out = tmp_path / "run"
    first = subprocess.Popen(_train_cmd(out), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: any(r.get("event") == "checkpoint" for r in _records(out)), first)
        second = subprocess.run(_train_cmd(out), cwd=REPO, capture_output=True, text=True, timeout=600)
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert second.returncode == 2 and len(errors) == 1, second.stderr[-3000:]
        assert f"is in use by another training run (host {socket.gethostname()}, pid {first.pid}, since " in errors[0]
        # Kill it while a save is written in the background (its temporary step directory exists).
        _wait_for(lambda: any(".orbax-checkpoint-tmp" in name for name in os.listdir(out / "checkpoints")), first)
        first.kill()
    finally:
        first.kill()
        first.wait()
    again = subprocess.run(_train_cmd(out), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    with open(out / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [(r["step"], r["loss"]) for r in records if "loss" in r] == expected
    assert sorted(os.listdir(out / "checkpoints")) == ["14", "16", "config.json"]


@pytest.mark.slow
def test_a_disk_that_fills_up_stops_the_run_in_one_line_and_a_relaunch_resumes(tmp_path):
    """The disk fills up (a file size limit set on the running process) after the checkpoint of
    step 2: one error line naming the step, the directory and the cause, exit 1, no Orbax
    tracebacks; the partial step is no checkpoint, and a relaunch resumes from the last complete one."""
    import re
    import resource

    out = tmp_path / "run"
    # Python ignores SIGXFSZ from its start, so a write past the limit fails with EFBIG, as one on a full
    # disk with ENOSPC; nothing to set in the child before it runs.
    proc = subprocess.Popen(_train_cmd(out), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: os.path.isdir(out / "checkpoints" / "2"), proc)
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))  # checkpoint files are 1-70 MB
        _, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
        proc.wait()
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1, stderr[-3000:]
    assert "Traceback" not in stderr and "ERROR" not in stderr, stderr[-3000:]
    found = re.fullmatch(rf"error: saving the checkpoint of step (\d+) in {out / 'checkpoints'} failed: File too large "
                         r"\(EFBIG\); the earlier checkpoints there are complete \(the next launch resumes from step (\d+)\)",
                         errors[0])
    assert found, errors[0]
    failed, resume = int(found.group(1)), int(found.group(2))
    steps = sorted(int(name) for name in os.listdir(out / "checkpoints") if name.isdigit())
    assert steps and steps[-1] == resume < failed
    with open(out / "metrics.jsonl") as f:  # "checkpoint" events name complete checkpoints only
        events = [record["step"] for record in map(json.loads, f) if record.get("event") == "checkpoint"]
    assert events and events[-1] == resume and failed not in events, events
    again = subprocess.run(_train_cmd(out), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"(steps {resume + 1}..16, completed)" in again.stdout
    assert sorted(os.listdir(out / "checkpoints")) == ["14", "16", "config.json"]  # the partial step removed
    assert [r["step"] for r in _records(out) + [{}] if "loss" in r] == list(range(1, 17))


def test_a_sigterm_before_the_training_steps_exits_143_in_one_line_and_leaves_no_temporary_file(tmp_path):
    """SIGTERM while the run sets up (here: once it holds its directory, while it builds the model
    and the data), before the loop's handler that stops after a step: it killed the process (a
    signal death, not exit 143, and no cleanup ran)."""
    import signal

    out = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(out), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: os.path.exists(out / "train.lock"), proc)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == [
        "error: stopped by SIGTERM outside the training steps; the next launch resumes from the last complete checkpoint"]
    leftovers = [os.path.join(d, f) for d, _, files in os.walk(out) for f in files if f.endswith(".tmp")]
    assert leftovers == [] and not os.path.exists(out / "metrics.jsonl")


def test_an_output_dir_that_cannot_be_written_is_refused_in_one_line_with_status_2(tmp_path, capsys):
    """It was a PermissionError traceback (exit 1) from the run lock. sysfs refuses a new folder
    also to root, for whom permission bits do not count."""
    if not os.path.isdir("/sys/kernel"):
        pytest.skip("needs sysfs")
    assert run.main(["train", "--set", "output_dir=/sys/manager_jax_run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write into /sys/manager_jax_run: Operation not permitted") and "Traceback" not in err, err
