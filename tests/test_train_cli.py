"""run.py: subcommand dispatch and lazy imports with clear errors."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import run  # noqa: E402


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
        (["--set", "optim.manager_lr=-1e-4", "--set", "optim.b2=1.0"], "optim.manager_lr must be >= 0"),
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
