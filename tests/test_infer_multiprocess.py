"""`run.py generate` / `run.py score` across two processes (jax.distributed, gloo on CPU).

Each process holds 2 of the 4 devices of one global mesh; rows and parameters are split across
the processes, and the answers must equal those of one process with the same 4 devices. Slow
(fresh processes that each compile): run with `-m slow`.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.test_infer_cli import save_tiny_checkpoint
from tests.test_train_multiprocess import REPO, TIMEOUT, _env, _free_port
from manager_jax.reference.parity import random_image


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer_mp")
    ckpt = save_tiny_checkpoint(str(root / "ckpt"))
    random_image((90, 70), 11).save(root / "photo.png")
    prompts = root / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is it?", "images": ["photo.png"]}) + "\n"
                       + json.dumps({"prompt": "Describe the picture in detail, please.", "images": ["photo.png"]}) + "\n")
    return ckpt, str(root / "photo.png"), str(prompts)


def _run(args: list[str], processes: int) -> list[str]:
    """stdout of each process of `run.py ARGS` (processes x 4/processes CPU devices)."""
    cmd = [sys.executable, "run.py", *args]
    if processes == 1:
        out = subprocess.run(cmd, cwd=REPO, env=_env(4), capture_output=True, text=True, timeout=TIMEOUT)
        assert out.returncode == 0, out.stderr[-3000:]
        return [out.stdout]
    port = _free_port()
    procs = [
        subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=_env(4 // processes, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                  JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i)))
        for i in range(processes)
    ]
    outputs = [p.communicate(timeout=TIMEOUT) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    return [out for out, _ in outputs]


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_two_processes_generate_and_score_as_one(files):
    ckpt, image, prompts = files
    # Rows split over data=2 (one per process), heads over tensor=2.
    generate = ["generate", "--checkpoint", ckpt, "--prompts", prompts, "--max-new-tokens", "4", "--json",
                "--mesh", "data=2,tensor=2"]
    single = _json_lines(_run(generate, 1)[0])
    first, second = _run(generate, 2)
    assert len(single) == 2 and _json_lines(first) == single
    assert _json_lines(second) == []  # only process 0 prints answers (gloo logs its connections)
    # Parameters split over fsdp=4 across both processes.
    score = ["score", "--checkpoint", ckpt, "--image", image, "--prompt", "What is it?", "--continuation",
             "A small picture.", "--json", "--mesh", "fsdp=-1"]
    (one,) = _json_lines(_run(score, 1)[0])
    (two,) = _json_lines(_run(score, 2)[0])
    assert two["num_tokens"] == one["num_tokens"] > 1 and two["is_greedy"] == one["is_greedy"]
    assert two["logprob"] == pytest.approx(one["logprob"], rel=1e-5)


@pytest.mark.slow
def test_a_bad_input_on_one_process_stops_every_process(files, tmp_path):
    """Process 1's prompts file names an image that is not there: it refuses (exit 2), and process 0,
    whose input is good, stops with it (exit 2) instead of waiting alone to start or in the first
    collective (it waited past 240 s before)."""
    ckpt, _, prompts = files
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "What is it?", "images": ["missing.png"]}) + "\n")
    port = _free_port()
    procs = [
        subprocess.Popen([sys.executable, "run.py", "generate", "--checkpoint", ckpt, "--prompts", path,
                          "--max-new-tokens", "2", "--json", "--mesh", "data=2"],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=_env(1, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                  JAX_PROCESS_ID=str(i)))
        for i, path in enumerate([prompts, str(bad)])
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [2, 2], [err[-2000:] for _, err in outputs]
    assert "error: another process refused its input" in outputs[0][1]
    assert "missing.png" in outputs[1][1] and "image not found" in outputs[1][1]
    assert _json_lines(outputs[0][0]) == []


@pytest.mark.slow
def test_two_processes_write_and_resume_one_answers_file(files, tmp_path):
    """--output: process 0 alone writes the file (both processes see this folder: a second writer
    would double the lines or be refused its lock), and a relaunch resumes after the lines process
    0 read there (process 1 learns their count); the file equals that of one process."""
    ckpt, _, prompts = files
    generate = ["generate", "--checkpoint", ckpt, "--prompts", prompts, "--max-new-tokens", "4", "--temperature", "3",
                "--mesh", "data=2,tensor=2"]
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    _run(generate + ["--output", str(one)], 1)
    _run(generate + ["--output", str(two)], 2)
    assert len(one.read_text().splitlines()) == 2 and two.read_bytes() == one.read_bytes()
    two.write_bytes(one.read_bytes().splitlines(keepends=True)[0])
    _run(generate + ["--output", str(two)], 2)
    assert two.read_bytes() == one.read_bytes()
