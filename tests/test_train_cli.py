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


def test_bad_recipe_path_fails_before_any_work():
    from manager_jax.train.recipe import RecipeError

    with pytest.raises(RecipeError, match="config file not found"):
        run.cmd_train(["--config", "configs/no_such_recipe.py"])
