"""`run.py generate --prompts FILE --output ANSWERS.jsonl`: the answers file, its resume after a
stop, the refusal of a file that holds other answers, and `--skip-bad`.

The answers of a resumed run are compared with those of one straight run and with the printed
answers of `--json` (tested against full forwards in test_infer_cli.py), with sampling on so that
each prompt's own random stream matters.
"""

from __future__ import annotations

import fcntl
import json
import shutil

import pytest

from manager_jax.infer import cli
from manager_jax.infer.engine import InferenceEngine
from tests.test_infer_cli import checkpoint, run  # noqa: F401  (the session's tiny checkpoint)

SAMPLING = ["--max-new-tokens", "3", "--temperature", "3", "--seed", "5"]


def write_prompts(path, image: str, count: int = 7) -> list[str]:
    """`count` lines, some with an id, the same question twice (their samples must differ)."""
    lines = []
    for i in range(count):
        record = {"prompt": "Tell me a story" if i in (1, 4) else f"Question {i}?", "images": [image]}
        if i % 2 == 0:
            record["id"] = f"q{i}"
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")
    return lines


def generate(ckpt, prompts, output, capsys, *extra) -> tuple[int, str, str]:
    return run(cli.generate_main, ["--checkpoint", ckpt, "--prompts", str(prompts), "--output", str(output),
                                   *SAMPLING, *extra], capsys)


def answers(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(checkpoint, tmp_path_factory):  # noqa: F811
    """(prompts file, answers file) of one uninterrupted run over 7 prompts, 2 per batch."""
    ckpt, image, _ = checkpoint
    root = tmp_path_factory.mktemp("straight")
    prompts, output = root / "prompts.jsonl", root / "answers.jsonl"
    write_prompts(prompts, image)
    assert cli.generate_main(["--checkpoint", ckpt, "--prompts", str(prompts), "--output", str(output), *SAMPLING,
                              "--batch-size", "2"]) == 0
    return prompts, output


def test_answers_file_holds_the_printed_answers_with_index_line_and_id(checkpoint, straight, capsys,  # noqa: F811
                                                                       monkeypatch):
    ckpt, image, _ = checkpoint
    prompts, output = straight
    monkeypatch.setattr(cli, "PROGRESS_EVERY_S", 0.0)
    code, out, err = run(cli.generate_main, ["--checkpoint", ckpt, "--prompts", str(prompts), "--json", *SAMPLING,
                                             "--batch-size", "3"], capsys)
    assert code == 0, err
    printed = [json.loads(line) for line in out.splitlines()]
    records = answers(output)
    assert [r["index"] for r in records] == list(range(7)) and [r["line"] for r in records] == list(range(1, 8))
    assert [r.get("id") for r in records] == ["q0", None, "q2", None, "q4", None, "q6"]
    assert [{k: r[k] for k in ("text", "token_ids", "finish_reason")} for r in records] == printed
    assert records[1]["token_ids"] != records[4]["token_ids"]  # the same question, its own stream
    assert "generate: 3/7 prompts, " in err and "generate: 6/7 prompts, " in err  # progress after each batch here
    assert "generate: done, 7 prompts (0 from before, 0 skipped, 7 answered: " in err and "tokens/s" in err


def test_a_run_stopped_after_two_batches_resumes_to_the_straight_runs_file(checkpoint, straight, capsys,  # noqa: F811
                                                                           monkeypatch, tmp_path):
    """Stopped in its third batch (after two were written), with a line cut short at the end of the
    file as a kill in the middle of a write leaves it: the relaunch (with another batch size) drops
    the cut line, and the file ends equal, byte for byte, to the straight run's."""
    ckpt, _, _ = checkpoint
    prompts, expected = straight
    output = tmp_path / "answers.jsonl"
    real_generate = InferenceEngine.generate
    calls = []

    def stopped_in_the_third_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(InferenceEngine, "generate", stopped_in_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        generate(ckpt, prompts, output, capsys, "--batch-size", "2")
    monkeypatch.setattr(InferenceEngine, "generate", real_generate)
    assert output.read_text() == "".join(expected.read_text().splitlines(keepends=True)[:4])
    with open(output, "a") as f:
        f.write('{"index": 4, "line": 5, "te')
    code, _, err = generate(ckpt, prompts, output, capsys, "--batch-size", "3")
    assert code == 0, err
    assert "resuming after 4 of 7 prompts" in err and "7 prompts (4 from before, 0 skipped, 3 answered" in err
    assert output.read_bytes() == expected.read_bytes()
    code, _, err = generate(ckpt, prompts, output, capsys)  # finished: nothing to do
    assert code == 0 and "7 prompts (7 from before, 0 skipped, 0 answered" in err
    assert output.read_bytes() == expected.read_bytes()


def test_an_answers_file_of_other_prompts_or_settings_is_refused(checkpoint, straight, capsys, tmp_path):  # noqa: F811
    """Exit 2 with the answers file's FILE:LINE, the file left as it was."""
    ckpt, image, _ = checkpoint
    prompts, expected = straight
    output = tmp_path / "answers.jsonl"
    output.write_bytes(b"".join(expected.read_bytes().splitlines(keepends=True)[:3]))
    before = output.read_bytes()

    lines = prompts.read_text().splitlines()
    edited = tmp_path / "edited.jsonl"
    edited.write_text("\n".join(lines[:1] + [json.dumps({"prompt": "Another question?", "images": [image]})]
                                + lines[2:]) + "\n")
    shorter = tmp_path / "shorter.jsonl"
    shorter.write_text("\n".join(lines[:2]) + "\n")
    cases = [
        (edited, [], f"{output}:2: not the answer of {edited}:2"),
        (prompts, ["--seed", "6"], f"{output}:1: generated with other settings"),
        (prompts, ["--max-new-tokens", "4"], f"{output}:1: generated with other settings"),
        (shorter, [], "has 3 lines but the prompts file has 2 prompts"),
    ]
    for path, extra, message in cases:
        code, out, err = run(cli.generate_main, ["--checkpoint", ckpt, "--prompts", str(path), "--output", str(output),
                                                 *SAMPLING, *extra], capsys)
        assert code == 2 and message in err and out == "", (extra, err)
        assert output.read_bytes() == before
    output.write_bytes(before + b"not json\n")
    code, _, err = generate(ckpt, prompts, output, capsys)
    assert code == 2 and f"{output}:4: not an answer line" in err, err

    output.write_bytes(before)
    with open(output, "ab") as holder:  # another run writing the same file
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, _, err = generate(ckpt, prompts, output, capsys)
    assert code == 2 and "is being written by another run" in err, err
    assert output.read_bytes() == before


def test_an_answers_file_of_an_earlier_step_of_the_run_is_refused(checkpoint, capsys, tmp_path):  # noqa: F811
    """--checkpoint names a training run, whose newest step changed since the answers were written:
    the answers of two steps are not mixed (the file used to record the run's folder only)."""
    ckpt, image, _ = checkpoint
    run_dir = tmp_path / "checkpoints"
    shutil.copytree(ckpt, run_dir / "1")
    prompts, output = tmp_path / "prompts.jsonl", tmp_path / "answers.jsonl"
    write_prompts(prompts, image, count=2)
    code, _, err = generate(str(run_dir), prompts, output, capsys, "--batch-size", "1")
    assert code == 0, err
    output.write_bytes(output.read_bytes().splitlines(keepends=True)[0])  # as if stopped after one answer
    before = output.read_bytes()
    shutil.copytree(ckpt, run_dir / "2")  # the run saved a newer step
    code, _, err = generate(str(run_dir), prompts, output, capsys, "--batch-size", "1")
    assert code == 2 and f"{output}:1: generated with other settings" in err, err
    assert output.read_bytes() == before


def test_a_prompts_file_written_with_a_bom_reads_and_a_folder_is_named(tmp_path):
    from manager_jax.infer.engine import InputError
    from manager_jax.infer.prompt_file import read_prompts

    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "Hi"}).encode() + b"\r\n")  # a Windows editor's
    (line,) = read_prompts(str(path))
    assert line.text == "Hi"
    with pytest.raises(InputError, match="is a directory; give a JSONL file"):
        read_prompts(str(tmp_path))


def test_refused_input_writes_no_answers_file(checkpoint, capsys, tmp_path):  # noqa: F811
    ckpt, image, _ = checkpoint
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "x", "images": [image]}) + "\n" + json.dumps({"prompt": "x",
                       "images": ["missing.png"]}) + "\n")
    output = tmp_path / "answers.jsonl"
    code, _, err = generate(ckpt, prompts, output, capsys)
    assert code == 2 and f"{prompts}:2: image not found" in err and not output.exists(), err
    code, _, err = generate(ckpt, prompts, tmp_path / "no" / "answers.jsonl", capsys)
    assert code == 2 and "its folder does not exist" in err, err
    with pytest.raises(SystemExit) as exit_:  # the skipped lines are listed in the answers file
        cli.generate_main(["--checkpoint", ckpt, "--prompts", str(prompts), "--skip-bad"])
    assert exit_.value.code == 2 and "--skip-bad lists the skipped lines in the --output file" in capsys.readouterr().err


def test_skip_bad_lists_the_bad_lines_and_answers_the_others_as_a_full_run(checkpoint, capsys, tmp_path):  # noqa: F811
    """Bad lines of every kind are skipped and listed with their cause; the good lines keep their
    index, hence their sampling stream: their answers are those of a file whose bad lines are good."""
    ckpt, image, root = checkpoint
    good = [json.dumps({"prompt": f"Question {i}?", "images": [image]}) for i in range(10)]
    bad = {
        1: (b"{not json", "not valid JSON"),
        3: (json.dumps({"prompt": "x", "images": ["nope.png"], "id": 3}).encode(), "image not found"),
        4: (json.dumps({"images": [image]}).encode(), "expected an object with a string 'prompt'"),
        5: (json.dumps({"prompt": "word " * 1200}).encode(), "more than the max_length of 1000"),
        6: (b'{"prompt": "caf\xe9"}', "not UTF-8 text"),
        # ids the answers file could not hold (they crashed the run after its first batches)
        8: (b'{"prompt": "y", "id": NaN}', "'id' must be writable as JSON"),
        9: (b'{"prompt": "y", "id": "\\ud800"}', "'id' must be writable as JSON"),
    }
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes(b"\n".join(bad[i][0] if i in bad else good[i].encode() for i in range(10)) + b"\n")
    clean = tmp_path / "clean.jsonl"
    clean.write_text("\n".join(good) + "\n")
    options = ["--max-length", "1000", "--batch-size", "2"]
    code, _, err = generate(ckpt, mixed, tmp_path / "mixed_answers.jsonl", capsys, *options, "--skip-bad")
    assert code == 0, err
    assert "10 prompts (0 from before, 7 skipped, 3 answered" in err
    records = answers(tmp_path / "mixed_answers.jsonl")
    assert [r["index"] for r in records] == list(range(10))
    for i, (_, cause) in bad.items():
        assert cause in records[i]["error"] and "text" not in records[i], (i, records[i])
    assert records[3]["id"] == 3
    code, _, err = generate(ckpt, clean, tmp_path / "clean_answers.jsonl", capsys, *options)
    assert code == 0, err
    full = answers(tmp_path / "clean_answers.jsonl")
    for i in (0, 2, 7):
        assert records[i]["token_ids"] == full[i]["token_ids"] and records[i]["text"] == full[i]["text"]
    # Without --skip-bad the first bad line refuses the file, named FILE:LINE.
    code, _, err = generate(ckpt, mixed, tmp_path / "strict.jsonl", capsys, *options)
    assert code == 2 and f"{mixed}:2: not valid JSON" in err, err
    mixed.write_bytes(good[0].encode() + b"\n" + bad[6][0] + b"\n")
    code, _, err = generate(ckpt, mixed, tmp_path / "strict.jsonl", capsys, *options)
    assert code == 2 and f"{mixed}:2: not UTF-8 text" in err and "Traceback" not in err, err


def test_skip_bad_with_every_line_bad_fails_and_lists_them(checkpoint, capsys, tmp_path):  # noqa: F811
    """--skip-bad keeps a run going past bad lines, but a file with no answer is a failed run (exit 1),
    whether its lines fail before the model load (JSON, images) or after it (lengths)."""
    ckpt, image, _ = checkpoint
    early = tmp_path / "early.jsonl"
    early.write_text('{not json\n' + json.dumps({"prompt": "x", "images": ["nope.png"]}) + "\n")
    # Lines that all fail before the model load do not load it: a checkpoint without weights does.
    no_weights = tmp_path / "no_weights"
    shutil.copytree(ckpt, no_weights, ignore=shutil.ignore_patterns("params"))
    code, _, err = generate(str(no_weights), early, tmp_path / "early_answers.jsonl", capsys, "--skip-bad")
    assert code == 1 and "every one of the 2 lines" in err and "Traceback" not in err, err
    records = answers(tmp_path / "early_answers.jsonl")
    assert ["not valid JSON" in records[0]["error"], "image not found" in records[1]["error"]] == [True, True]
    late = tmp_path / "late.jsonl"
    late.write_text(json.dumps({"prompt": "word " * 1200, "images": [image]}) + "\n")
    code, _, err = generate(ckpt, late, tmp_path / "late_answers.jsonl", capsys, "--skip-bad", "--max-length", "1000")
    assert code == 1 and "every one of the 1 lines" in err, err
    assert "more than the max_length of 1000" in answers(tmp_path / "late_answers.jsonl")[0]["error"]


@pytest.mark.slow
def test_a_killed_process_resumes_to_the_straight_runs_file(checkpoint, straight, tmp_path):  # noqa: F811
    """`run.py generate --output` killed with SIGKILL once its file has answers (no handler runs),
    then relaunched: the file ends equal to the straight run's."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.test_train_multiprocess import REPO, TIMEOUT, _env

    ckpt, _, _ = checkpoint
    prompts, expected = straight
    output = tmp_path / "answers.jsonl"
    cmd = [sys.executable, "run.py", "generate", "--checkpoint", ckpt, "--prompts", str(prompts), "--output",
           str(output), *SAMPLING, "--batch-size", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + TIMEOUT
    while not (output.exists() and output.read_bytes().count(b"\n") >= 2) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    written = output.read_bytes()
    assert 2 <= written.count(b"\n") < 7, written  # killed part way
    assert expected.read_bytes().startswith(written[: written.rfind(b"\n") + 1])
    done = subprocess.run(cmd, cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert output.read_bytes() == expected.read_bytes()
