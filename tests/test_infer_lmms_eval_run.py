"""lmms-eval's own command line (`python -m lmms_eval eval`) evaluating the adapter on a local task,
as one process and as two data-parallel processes under `torchrun` and `accelerate launch` (the
original's `accelerate launch --num_processes N`), when lmms-eval and what its evaluator imports are
installed (README.md). Skipped otherwise.

The adapter is found through the pyproject.toml entry point, as after `pip install -e .`: a
dist-info folder holding that entry point goes on the subprocesses' path. The task (a YAML file
passed with --include_path, its documents a local JSON file with generated images) has an
exact_match metric. Expected answers: the engine's greedy answers to the prompts built here by the
conversation module; the first document's target is its expected answer, so the metric is not 0.
lmms-eval's command line exits 0 even when the evaluation raised, so the tests read its output files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval.__main__")  # accelerate, sacrebleu, ... (the evaluator's imports)
pytest.importorskip("filelock._api")  # lmms-eval 0.7.3's evaluator patches it (absent from filelock 4)
pytest.importorskip("pytablewriter")  # the results table it prints at the end

from manager_jax.data.conversation import build_eval_prompt  # noqa: E402
from manager_jax.infer.engine import Prompt  # noqa: E402
from manager_jax.infer.lmms_adapter import MODEL_NAME, LlavaOVManagerJax  # noqa: E402
from manager_jax.infer.sampling import SamplingParams  # noqa: E402
from manager_jax.reference.parity import random_image  # noqa: E402
from tests.test_infer_cli import checkpoint  # noqa: E402, F401 (a shared fixture)

REPO = Path(__file__).resolve().parents[1]
TASK = "manager_jax_local_vqa"
MAX_NEW_TOKENS = 3
SIZES = [(80, 60), (50, 90), (64, 64), (100, 40), (30, 70)]

TASK_UTILS = '''from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]
'''


def task_yaml(data_file: str) -> str:
    return f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {MAX_NEW_TOKENS}
  temperature: 0
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def entry_point_folder(root: Path) -> Path:
    """A folder that makes pyproject.toml's lmms_eval.models entry point visible, as an install does."""
    entry_points = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]
    info = root / "site" / "manager_jax-0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: manager_jax\nVersion: 0.0\n")
    lines = [f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in table.items())
             for group, table in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines))
    return info.parent


@pytest.fixture(scope="module")
def local_task(checkpoint, tmp_path_factory):  # noqa: F811
    """(task folder, environment for lmms-eval, expected answer per doc_id, targets per doc_id)."""
    ckpt, _, _ = checkpoint
    root = tmp_path_factory.mktemp("lmms_eval_run")
    lm = LlavaOVManagerJax(pretrained=ckpt, dtype="float32")
    docs, prompts = [], []
    for doc_id, size in enumerate(SIZES):
        image = root / f"doc{doc_id}.png"
        random_image(size, 100 + doc_id).save(image)
        docs.append({"question": f"What is in picture {doc_id}?", "image": str(image)})
        prompts.append(Prompt(build_eval_prompt(docs[-1]["question"], 1, lm.tokenizer),
                              [random_image(size, 100 + doc_id)]))
    generated = lm.engine.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW_TOKENS))
    expected = [lm.tokenizer.decode(g.token_ids, skip_special_tokens=True).strip() for g in generated]
    targets = [expected[0]] + ["a cat"] * (len(docs) - 1)
    tasks = root / "tasks"
    tasks.mkdir()
    with open(root / "docs.jsonl", "w") as f:
        for doc, target in zip(docs, targets):
            f.write(json.dumps(dict(doc, answer=target)) + "\n")
    (tasks / "utils.py").write_text(TASK_UTILS)
    (tasks / "task.yaml").write_text(task_yaml(str(root / "docs.jsonl")))
    env = dict(os.environ, HF_HOME=str(root / "hf"), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(entry_point_folder(root)), str(REPO), os.environ.get("PYTHONPATH", "")]))
    return tasks, env, dict(enumerate(expected)), dict(enumerate(targets))


def evaluate(launcher: list[str], checkpoint_dir: str, local_task, out: Path) -> tuple[dict, list[dict]]:
    """Runs lmms-eval's command line; (results JSON, logged samples)."""
    tasks, env, _, _ = local_task
    command = launcher + ["-m", "lmms_eval", "eval", "--model", MODEL_NAME,
                          "--model_args", f"pretrained={checkpoint_dir},dtype=float32",
                          "--tasks", TASK, "--include_path", str(tasks), "--batch_size", "1",
                          "--log_samples", "--output_path", str(out)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    log = (proc.stdout + proc.stderr)[-4000:]
    results = list(out.glob("*/*_results.json"))
    samples = list(out.glob(f"*/*_samples_{TASK}.jsonl"))
    assert proc.returncode == 0 and len(results) == 1 and len(samples) == 1, log
    return json.loads(results[0].read_text()), [json.loads(line) for line in samples[0].read_text().splitlines()]


def check(results: dict, samples: list[dict], local_task) -> None:
    _, _, expected, targets = local_task
    assert sorted(s["doc_id"] for s in samples) == sorted(expected)  # every document once
    assert {s["doc_id"]: s["filtered_resps"] for s in samples} == expected
    matches = [expected[d] == targets[d] for d in expected]
    assert results["results"][TASK]["exact_match,none"] == pytest.approx(sum(matches) / len(matches))
    assert sum(matches) >= 1


@pytest.mark.slow
def test_lmms_eval_command_line_one_process(checkpoint, local_task, tmp_path):  # noqa: F811
    results, samples = evaluate([sys.executable], checkpoint[0], local_task, tmp_path / "out")
    check(results, samples, local_task)


# The original's `accelerate launch --num_processes N`; on a host without GPUs --multi_gpu makes it
# start N processes as on GPUs (torchrun's launcher; without it, CPU runs go through MPI).
LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    "accelerate": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no"],
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_lmms_eval_command_line_two_processes(checkpoint, local_task, tmp_path, launcher):  # noqa: F811
    """As the original's data parallelism: each process answers its share of the documents
    (lmms-eval splits them by RANK, rank 0 gathers); together, each document once, the same answers."""
    results, samples = evaluate([sys.executable] + LAUNCHERS[launcher], checkpoint[0], local_task, tmp_path / "out")
    check(results, samples, local_task)
    # rank 0's documents come first in the gathered samples: 0, 2, 4 then rank 1's 1, 3.
    assert [s["doc_id"] for s in samples] == [0, 2, 4, 1, 3]
