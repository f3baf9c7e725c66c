"""The command line: to-orbax / from-orbax / inspect, exit codes and messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from manager_jax.config import tiny
from tools.convert_weights import convert, testing
from tools.convert_weights.cli import build_parser, main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tensors, _, _ = testing.write_original_checkpoint(str(root / "src"), tiny("grid_manager"), num_shards=2,
                                                      dtype=torch.bfloat16)
    (root / "tok").mkdir()
    (root / "tok" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 16384}))
    (root / "tok" / "vocab.json").write_text("{}")
    return root, tensors


def test_to_orbax_from_orbax_inspect(ckpt, tmp_path, capsys):
    root, tensors = ckpt
    assert main(["to-orbax", str(root / "src"), str(tmp_path / "p"), "--dtype", "bf16", "--quiet"]) == 0
    assert main(["from-orbax", str(tmp_path / "p"), str(tmp_path / "out"), "--format", "llava",
                 "--tokenizer", str(root / "tok"), "--quiet"]) == 0
    out_files = set(os.listdir(tmp_path / "out"))
    assert {"config.json", "tokenizer_config.json", "vocab.json"} <= out_files
    back = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(back) == set(tensors)
    capsys.readouterr()
    assert main(["inspect", str(root / "src")]) == 0
    text = capsys.readouterr().out
    assert text.startswith("format: llava (llava names)")
    assert "manager: static_zerouni" in text and "model.manager.1.layer_scores" in text and "[1, 4, 1, 64]" in text
    assert main(["inspect", str(tmp_path / "p")]) == 0
    text = capsys.readouterr().out
    assert text.startswith("format: orbax")
    assert "manager.blocks.0.layer_scores" in text and "[3, 64]" in text and "bfloat16" in text


def test_rejected_input_exits_2_with_one_message(ckpt, tmp_path, capsys):
    root, _ = ckpt
    os.makedirs(tmp_path / "bad")
    for name in os.listdir(root / "src"):
        if name != "model-00002-of-00002.safetensors":
            (tmp_path / "bad" / name).write_bytes((root / "src" / name).read_bytes())
    assert main(["to-orbax", str(tmp_path / "bad"), str(tmp_path / "p"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot convert") and "model-00002-of-00002.safetensors" in err
    assert not os.path.exists(tmp_path / "p")
    assert main(["inspect", str(tmp_path / "bad")]) == 1  # reported, and a nonzero status
    assert "unreadable" in capsys.readouterr().out


def test_python_dash_m_entry_point(ckpt, tmp_path):
    root, _ = ckpt
    proc = subprocess.run([sys.executable, "-m", "tools.convert_weights", "to-orbax", str(root / "src"),
                           str(tmp_path / "p"), "--format", "hf"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "--format hf but config.json looks like llava" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "tools.convert_weights", "from-orbax", "a", "b"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--format" in proc.stderr


def test_overwrite_never_deletes_the_source(ckpt, tmp_path, capsys):
    root, _ = ckpt
    same = tmp_path / "same"
    same.mkdir()
    assert main(["to-orbax", str(root / "src"), str(same / "p"), "--quiet"]) == 0
    (same / "sibling").mkdir()
    before = sorted(os.listdir(same / "p"))
    capsys.readouterr()
    # The audit's repro: DST holds SRC (it deleted SRC and its sibling), DST is SRC, DST inside SRC.
    for dst in (same, same / "p", same / "p" / "params"):
        assert main(["to-orbax", str(same / "p"), str(dst), "--overwrite", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "--overwrite would delete what is being converted" in err, err
        assert main(["from-orbax", str(same / "p"), str(dst), "--format", "llava", "--overwrite", "--quiet"]) == 2
        assert "--overwrite would delete what is being converted" in capsys.readouterr().err
    assert sorted(os.listdir(same)) == ["p", "sibling"] and sorted(os.listdir(same / "p")) == before
    # The tokenizer folder is a source of from-orbax too.
    assert main(["from-orbax", str(same / "p"), str(root / "tok"), "--format", "llava",
                 "--tokenizer", str(root / "tok"), "--overwrite", "--quiet"]) == 2
    assert os.path.isfile(root / "tok" / "vocab.json")


def test_hf_export_of_an_original_convention_model_needs_consent(ckpt, tmp_path, capsys):
    root, _ = ckpt
    assert main(["to-orbax", str(root / "src"), str(tmp_path / "p"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["from-orbax", str(tmp_path / "p"), str(tmp_path / "hf"), "--format", "hf", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "'original' image convention" in err and "--accept-hf-convention" in err and "--format llava" in err
    assert not os.path.exists(tmp_path / "hf")
    assert main(["from-orbax", str(tmp_path / "p"), str(tmp_path / "hf"), "--format", "hf", "--accept-hf-convention",
                 "--quiet"]) == 0
    assert main(["to-orbax", str(tmp_path / "hf"), str(tmp_path / "back"), "--quiet"]) == 0
    assert json.loads((tmp_path / "back" / "config.json").read_text())["image"]["convention"] == "original"


def test_hf_export_needs_an_anyres_max_model(tmp_path, capsys):
    """transformers' LlavaOnevision reads N from vision_aspect_ratio 'anyres_max_N' for every tiled image
    (int("") for stage 1.5's 'anyres'): such an export would load and then fail on its first image."""
    cfg = tiny("grid_manager")
    cfg.image.aspect_ratio = "anyres"
    testing.write_original_checkpoint(str(tmp_path / "src"), cfg)
    assert main(["to-orbax", str(tmp_path / "src"), str(tmp_path / "p"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["from-orbax", str(tmp_path / "p"), str(tmp_path / "hf"), "--format", "hf",
                 "--accept-hf-convention", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "image_aspect_ratio='anyres'" in err and "--format llava" in err, err
    assert not os.path.exists(tmp_path / "hf")
    assert main(["from-orbax", str(tmp_path / "p"), str(tmp_path / "llava"), "--format", "llava", "--quiet"]) == 0


def test_inspect_exits_1_on_what_it_cannot_read(ckpt, tmp_path, capsys):
    root, _ = ckpt
    assert main(["inspect", str(tmp_path / "nonexistent")]) == 1
    assert "does not exist" in capsys.readouterr().out
    (tmp_path / "red.png").write_bytes(b"\x89PNG not a checkpoint")
    assert main(["inspect", str(tmp_path / "red.png")]) == 1
    assert main(["to-orbax", str(root / "src"), str(tmp_path / "p"), "--quiet"]) == 0
    capsys.readouterr()
    os.remove(tmp_path / "p" / "params" / "_METADATA")  # a damaged params directory: reported, no traceback
    assert main(["inspect", str(tmp_path / "p")]) == 1
    assert "unreadable:" in capsys.readouterr().out
    (tmp_path / "p" / "config.json").write_text("{oops")
    assert main(["inspect", str(tmp_path / "p")]) == 1
    assert "config.json: not valid JSON" in capsys.readouterr().out


def test_a_written_checkpoint_that_does_not_read_back_exits_1_and_leaves_nothing(ckpt, tmp_path, capsys, monkeypatch):
    """A shard damaged after it was written (a full disk, a bad mount): the conversion ran, so the
    status is 1 (failed), not 2 (bad input), and no partial destination is left."""
    from tools.convert_weights import convert

    root, _ = ckpt
    assert main(["to-orbax", str(root / "src"), str(tmp_path / "p"), "--quiet"]) == 0
    real_write = convert.write_checkpoint

    def write_then_truncate(directory, *args, **kwargs):
        names = real_write(directory, *args, **kwargs)
        shard = os.path.join(directory, next(n for n in names if n.endswith(".safetensors")))
        os.truncate(shard, os.path.getsize(shard) // 2)
        return names

    monkeypatch.setattr(convert, "write_checkpoint", write_then_truncate)
    capsys.readouterr()
    assert main(["from-orbax", str(tmp_path / "p"), str(tmp_path / "out"), "--format", "llava", "--quiet"]) == 1
    assert "written checkpoint does not read back" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["p"]


@pytest.mark.parametrize("size", ["5XB", "", "0", "-1", "GB"])
def test_a_bad_max_shard_size_is_refused_with_one_line(ckpt, tmp_path, capsys, size):
    root, _ = ckpt
    assert main(["to-orbax", str(root / "src"), str(tmp_path / "p"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["from-orbax", str(tmp_path / "p"), str(tmp_path / "out"), "--format", "llava",
                 "--max-shard-size", size, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--max-shard-size" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "out")


# A full disk, as the writer sees it: the child sets a 40 KB file size limit on itself and execs the
# command in its arguments, whose writes past it fail with EFBIG (Python ignores SIGXFSZ). Set in the
# child, not by a preexec_fn: that forks this multithreaded JAX process.
_LIMIT_FILE_SIZE = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000)); "
                    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")


def test_a_write_that_fails_is_one_error_line_exit_1_and_leaves_nothing(ckpt, tmp_path):
    root, _ = ckpt
    assert main(["to-orbax", str(root / "src"), str(tmp_path / "p"), "--quiet"]) == 0
    out = tmp_path / "out"
    out.mkdir()
    for args in (["to-orbax", str(root / "src"), str(out / "p")],
                 ["from-orbax", str(tmp_path / "p"), str(out / "hf"), "--format", "llava"]):
        proc = subprocess.run([sys.executable, "-c", _LIMIT_FILE_SIZE, "-m", "tools.convert_weights", *args, "--quiet"],
                              cwd=REPO, capture_output=True, text=True)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-2000:]
        tail = proc.stderr[proc.stderr.index("error:"):]
        assert "reading or writing failed" in tail and "File too large" in tail
        # Orbax's writer threads no longer log the same failure first, with its traceback.
        assert "Traceback" not in proc.stderr and "raised an exception" not in proc.stderr, proc.stderr[-2000:]
        assert os.listdir(out) == []


@pytest.mark.parametrize("command", ["to-orbax", "from-orbax"])
def test_an_empty_destination_is_refused_and_the_working_directory_kept(ckpt, tmp_path, monkeypatch, capsys, command):
    """An empty DST (an unset shell variable) resolved to the working directory, which --overwrite replaced."""
    root, _ = ckpt
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "keep.txt").write_text("mine")
    monkeypatch.chdir(cwd)
    src = root / "src"
    if command == "from-orbax":
        convert.to_orbax(str(src), str(tmp_path / "params"))
        src = tmp_path / "params"
    extra = ["--format", "llava"] if command == "from-orbax" else []
    code = main([command, str(src), "", "--overwrite", "--quiet", *extra])
    err = capsys.readouterr().err
    assert code == 2 and "empty" in err, err
    assert os.listdir(cwd) == ["keep.txt"]


@pytest.mark.parametrize("command", ["to-orbax", "from-orbax"])
@pytest.mark.parametrize("below", ["x", "x/y"])
def test_a_destination_under_a_file_is_refused_before_anything_is_read(ckpt, tmp_path, capsys, command, below):
    """DST inside a regular file failed only when the write began, as a FileExistsError / NotADirectoryError
    with status 1: it is bad input, said before the source is read."""
    root, _ = ckpt
    src = str(root / "src")
    if command == "from-orbax":
        convert.to_orbax(src, str(tmp_path / "params"))
        src = str(tmp_path / "params")
    (tmp_path / "config.json").write_text("mine")
    extra = ["--format", "llava"] if command == "from-orbax" else []
    code = main([command, src, str(tmp_path / "config.json" / below), "--overwrite", "--quiet", *extra])
    err = capsys.readouterr().err
    assert code == 2 and f"{tmp_path / 'config.json'} is not a directory" in err and "FileExistsError" not in err, err
    assert (tmp_path / "config.json").read_text() == "mine"
    # DST the file itself: --overwrite replaced it with the output folder
    code = main([command, src, str(tmp_path / "config.json"), "--overwrite", "--quiet", *extra])
    err = capsys.readouterr().err
    assert code == 2 and "is a file; the output is a directory" in err, err
    assert (tmp_path / "config.json").read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a directory whatever its mode")
def test_a_destination_whose_parent_is_not_writable_is_refused_up_front(ckpt, tmp_path, capsys):
    root, _ = ckpt
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(["to-orbax", str(root / "src"), str(locked / "p"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"{locked} is not writable" in err, err
        assert os.listdir(locked) == []
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("command", ["to-orbax", "from-orbax"])
def test_overwrite_writes_through_a_symlink_destination(ckpt, tmp_path, capsys, command):
    """--overwrite of a DST that links to a directory replaced the link with a directory and left the
    target untouched; now the target is replaced and the link kept (as cp / rsync write through)."""
    root, _ = ckpt
    src = str(root / "src")
    if command == "from-orbax":
        convert.to_orbax(src, str(tmp_path / "params"))
        src = str(tmp_path / "params")
    extra = ["--format", "llava"] if command == "from-orbax" else []
    target, link = tmp_path / "releases" / "v3", tmp_path / "current"
    target.mkdir(parents=True)
    (target / "old.txt").write_text("old")
    link.symlink_to(target, target_is_directory=True)
    assert main([command, src, str(link), "--quiet", *extra]) == 2  # it exists: --overwrite still needed
    assert "--overwrite" in capsys.readouterr().err
    assert main([command, src, str(link), "--overwrite", "--quiet", *extra]) == 0
    assert link.is_symlink() and os.path.realpath(link) == str(target)
    assert "old.txt" not in os.listdir(target) and "config.json" in os.listdir(target)
    assert sorted(os.listdir(target.parent)) == ["v3"]  # no temporary or replaced copy left beside it
    subcommand = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    assert "a symlink is written through" in " ".join(subcommand.format_help().split())


def test_a_destination_created_during_the_conversion_names_the_flag(ckpt, tmp_path):
    """DST created by another process after the up-front check: the library's refusal reaches the
    user, and it must name --overwrite, not the Python argument overwrite=True."""
    root, _ = ckpt
    dst = tmp_path / "p"
    with pytest.raises(convert.ConversionError) as info:  # progress runs after the check, before the write
        convert.to_orbax(str(root / "src"), str(dst), progress=lambda msg: dst.mkdir(exist_ok=True))
    assert "--overwrite" in str(info.value) and "overwrite=True" not in str(info.value), info.value
    assert os.listdir(dst) == []


@pytest.mark.parametrize("argv, flag", [
    (["verify", "--image-size", "0x5"], "--image-size"),
    (["verify", "--image-size", "100000x100000"], "--image-size"),  # out of memory, exit 1, with a traceback
    (["verify", "--image-size", "big"], "--image-size"),
    (["verify", "--seed", "-1"], "--seed"),  # numpy's ValueError with a traceback
    (["verify", "--seed", str(2**32)], "--seed"),
    (["verify", "--max-kl", "nan"], "--max-kl"),  # compared False: every check passed
    (["verify", "--min-top1", "-1"], "--min-top1"),
    (["to-orbax", "SRC", "DST", "--seed", "-1"], "--seed"),
])
def test_bad_option_values_are_usage_errors_naming_the_flag(capsys, argv, flag):
    if argv[0] == "verify":
        argv = argv[:1] + ["--torch", "no/such/torch", "--jax", "no/such/jax"] + argv[1:]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and f"error: argument {flag}: " in capsys.readouterr().err
