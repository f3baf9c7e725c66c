"""The training loop with the real data pipeline: exact resume after SIGTERM, NaN aborts, init_from."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import shutil
import signal
import socket

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from manager_jax.train import loop as loop_lib
from manager_jax.train.checkpointing import Checkpointer
from manager_jax.train.metrics import read_metrics
from manager_jax.train.recipe import RecipeError, load_recipe
from tests.train_batches import compile_cache_fixture

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "demo.py")


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    yield from compile_cache_fixture(tmp_path_factory)


def demo_config(output_dir, *overrides):
    """The demo recipe, shortened: 6 steps, rows of 832 tokens, one device, quiet."""
    base = [
        f"output_dir={output_dir}", "num_steps=6", "synthetic_records=40", "data.seq_len=832",
        "checkpoint.every_steps=0", "logging.progress_bar=False", "logging.tensorboard=False",
        "mesh.fsdp=1", "mesh.num_devices=1", "batch_shards=1", "loss_token_budget=96",
    ]
    return load_recipe(DEMO, base + list(overrides))


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    result = loop_lib.train(demo_config(out), keep_state=True)
    return out, result


def read_data_states(directory, step):
    ckpt = Checkpointer(str(directory))
    try:
        return ckpt.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
    finally:
        ckpt.close()


def _sigterm_at(step_to_stop, seen: list):
    def on_step(step, record):
        seen.append((step, loop_lib.DataFeed.batches_read))
        if step == step_to_stop:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets a flag; the loop saves and returns

    return on_step


def test_resume_after_sigterm_is_exact(straight_run, tmp_path, monkeypatch):
    out_a, a = straight_run
    assert a.status == "completed" and len(a.losses) == 6
    assert a.losses[-1] < a.losses[0]
    original_next = loop_lib.DataFeed.next

    def counted_next(self):
        loop_lib.DataFeed.batches_read += 1
        return original_next(self)

    monkeypatch.setattr(loop_lib.DataFeed, "batches_read", 0, raising=False)
    monkeypatch.setattr(loop_lib.DataFeed, "next", counted_next)
    config = demo_config(tmp_path)
    seen = []
    first = loop_lib.train(config, on_step=_sigterm_at(3, seen))
    # The loop runs one step ahead: a step's metrics are read once the next step is dispatched (and
    # the batch after it read), so the SIGTERM that came while step 4 ran stops the run after step 4.
    assert seen == [(1, 3), (2, 4), (3, 5), (4, 5)]
    assert first.status == "stopped" and first.last_step == 4 and first.stop_signal == signal.SIGTERM
    ckpt = Checkpointer(first.checkpoint_dir)
    assert ckpt.all_steps() == [4]
    saved_recipe = ckpt.read_recipe()
    ckpt.close()
    assert saved_recipe == config.to_dict()  # the resolved config travels with the checkpoint
    second = loop_lib.train(demo_config(tmp_path), keep_state=True)
    assert second.first_step == 4 and second.last_step == 6 and second.status == "completed"
    assert second.stop_signal is None
    # Bit-equal on CPU: same data order (restored iterator states), same rng, same updates.
    assert first.losses + second.losses == a.losses
    for x, y in zip(jax.tree.leaves(second.state["params"]), jax.tree.leaves(a.state["params"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # ... and the checkpointed iterator positions after step 6 agree.
    assert read_data_states(tmp_path / "checkpoints", 6) == read_data_states(out_a / "checkpoints", 6)
    records = read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in records] == a.losses
    for key in ("grad_norm", "lr/projector", "tokens_per_s", "samples_per_s", "step_time_s", "mfu"):
        assert key in records[0]
    # The host's resident memory at each logged step: under this process's peak (give or take the
    # kernel's lazily summed page counters), over what the loaded libraries and model take.
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    rss = [r["host_rss_gb"] for r in records]
    assert all(0.2 < r <= 1.05 * peak_gb for r in rss), (rss, peak_gb)


def test_nonfinite_steps_abort_after_k_in_a_row(tmp_path, monkeypatch):
    original_next = loop_lib.DataFeed.next

    def poisoned(self):
        fetched = original_next(self)
        if fetched is None:
            return None
        arrays, over = fetched
        arrays["pixel_values"] = np.full_like(arrays["pixel_values"], np.nan)
        return arrays, over

    monkeypatch.setattr(loop_lib.DataFeed, "next", poisoned)
    message = (r"2 non-finite steps in a row \(max_nonfinite_steps=2\), steps 1\.\.2: the loss and the gradient norm "
               r"were not finite at step 2 \(loss nan, grad norm nan\); last finite step: none in this run; "
               r"no checkpoint saved: a relaunch starts over; lower optim.lr")
    with pytest.raises(loop_lib.TrainingError, match=message):
        loop_lib.train(demo_config(tmp_path, "max_nonfinite_steps=2"))
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    skipped = [e for e in events if e.get("event") == "nonfinite_step_skipped"]
    assert [e["step"] for e in skipped] == [1, 2]
    # Each step has its record, the one that stopped the run too (README: "skipped": true in it).
    assert [(e["step"], e["skipped"]) for e in events if "event" not in e] == [(1, True), (2, True)]


def test_init_from_loads_the_parameters_it_finds(tmp_path):
    from manager_jax import params_io
    from manager_jax.sharding import MeshConfig, make_mesh
    from manager_jax.train.state import init_params, make_setup
    from manager_jax.train.step import LossConfig

    config = demo_config(tmp_path)
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    setup = make_setup(config.model, mesh, tunable_parts=config.tunable_parts, optim=config.optim,
                       total_steps=6, loss=LossConfig())
    source = jax.tree.map(np.asarray, init_params(setup, seed=7))
    fresh = jax.tree.map(np.asarray, init_params(setup, seed=8))
    # A stage-1-style params dir with only the projector (as `mm_projector.bin`).
    params_io.save_params(str(tmp_path / "projector_only"), {"projector": source["projector"]}, config.model,
                          validate=False)
    loaded, missing = loop_lib.load_initial_params(setup, init_params(setup, seed=8), str(tmp_path / "projector_only"),
                                                   strict=False)
    np.testing.assert_array_equal(np.asarray(loaded["projector"]["linear1"]["kernel"]), source["projector"]["linear1"]["kernel"])
    np.testing.assert_array_equal(np.asarray(loaded["text"]["norm"]["scale"]), fresh["text"]["norm"]["scale"])
    assert "text.embed.embedding" in missing and not any(m.startswith("projector.") for m in missing)
    with pytest.raises(loop_lib.TrainingError, match="init_strict"):
        loop_lib.load_initial_params(setup, init_params(setup, seed=8), str(tmp_path / "projector_only"), strict=True)


def test_batches_over_the_loss_token_budget_use_the_full_loss(straight_run, tmp_path):
    """A batch with more supervised tokens than loss_token_budget falls back to all positions."""
    _, a = straight_run
    result = loop_lib.train(demo_config(tmp_path, "loss_token_budget=4", "stop_at_step=1"))
    assert result.status == "stopped" and result.stop_signal is None  # asked for: not a preemption
    assert result.losses[0] == pytest.approx(a.losses[0], rel=1e-6)


def _copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def _snapshot(directory):
    """{relative path: content hash} of every file under `directory`."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.text.intermediate_size=256"], r"another run .*\n  - model.text.intermediate_size: 128 -> 256"),
        (["tunable_parts=mm_mlp_adapter"], r"tunable_parts: 'mm_mlp_adapter,mm_manager,mm_language_model' -> 'mm_mlp_adapter'"),
        (["synthetic_records=None", "data.data_path={out}/data/records.json", "data.image_folder={out}/data"],
         r"  - synthetic_records: 40 -> None"),
        (["checkpoint.resume=False"], r"already holds checkpoints \(steps 6\) and checkpoint.resume=False.*another output_dir"),
        # Other data shards (as a new mesh resolves batch_shards=-1 to): the error says how to keep them.
        (["batch_shards=2"], r"  - batch_shards \(resolved\): 1 -> 2 .*--set batch_shards=1 keeps the checkpoint's shards"),
        # Both were accepted, then failed to restore (a "damaged checkpoint", or a KeyError traceback).
        (["optim.max_grad_norm=0"], r"  - optim.max_grad_norm: 1.0 -> 0.0 \(clipping turned on or off"),
        (["data.worker_count=1"], r"  - data.worker_count: 0 -> 1"),
    ],
)
def test_a_refused_resume_changes_nothing_in_the_run_directory(straight_run, tmp_path, overrides, message):
    out = _copy_run(straight_run[0], tmp_path / "run")
    before = _snapshot(out)
    overrides = [o.format(out=out) for o in overrides]
    with pytest.raises(RecipeError, match=message):
        loop_lib.train(demo_config(out, "num_steps=8", *overrides))
    assert _snapshot(out) == before  # recipe.json and checkpoints/config.json untouched


def test_the_runs_throughput_is_the_median_of_its_steps_after_the_first(straight_run):
    out, result = straight_run
    records = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert records[0]["includes_compile"] and not any(r.get("includes_compile") for r in records[1:])
    later = records[1:]
    assert result.throughput["step_time_s"] == float(np.median([r["step_time_s"] for r in later]))
    assert result.throughput["tokens_per_s"] == float(np.median([r["tokens_per_s"] for r in later]))
    assert result.throughput["samples_per_s"] == float(np.median([r["samples_per_s"] for r in later]))
    assert result.throughput["mfu"] is None  # no peak FLOPs known for a CPU
    assert loop_lib.format_throughput(result.throughput).startswith(f"median step {np.median([r['step_time_s'] for r in later]):.3f} s, ")


def test_resume_accepts_other_settings_and_keeps_each_step_once_in_the_metrics(straight_run, tmp_path, caplog):
    out = _copy_run(straight_run[0], tmp_path / "run")
    with open(out / "metrics.jsonl", "a") as f:  # what a run killed after step 7 leaves: records after the checkpoint
        f.write(json.dumps({"step": 7, "loss": 99.0}) + "\n" + '{"step": 8, "lo')
    saved = json.loads((out / "recipe.json").read_text())
    # The same batch, now with grad_accum derived (-1) from the global batch size: no change to the run.
    derived = ["grad_accum=-1", f"global_batch_size={saved['global_batch_size']}"]
    with caplog.at_level(logging.INFO, logger="manager_jax"):
        result = loop_lib.train(demo_config(out, "num_steps=7", "optim.lr=1e-3", *derived))
    assert result.first_step == 6 and result.last_step == 7
    assert result.throughput == {}  # its one step is the call's first, which compiles
    assert "resuming with changed settings: num_steps: 6 -> 7; optim.lr: 0.003 -> 0.001\n" in caplog.text + "\n"
    records = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7]
    assert records[-1]["loss"] == result.losses[0]
    resolved = json.loads((out / "recipe.json").read_text())
    assert resolved["num_steps"] == 7 and resolved["grad_accum"] == saved["grad_accum"] >= 1  # the value used


def test_resume_past_num_steps_says_there_is_nothing_to_train(straight_run, tmp_path, caplog):
    out = _copy_run(straight_run[0], tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="manager_jax"):
        result = loop_lib.train(demo_config(out, "num_steps=4"))
    assert result.first_step == result.last_step == 6 and result.losses == []
    assert "checkpoint is at step 6, num_steps is 4: nothing to train" in caplog.text


def test_ctrl_c_saves_and_stops_and_data_skips_are_reported(straight_run, tmp_path, caplog):
    """A wrong image_folder: the image records are skipped, and the run says so."""
    data = straight_run[0] / "data"
    (tmp_path / "no_images").mkdir()
    config = demo_config(tmp_path / "run", "synthetic_records=None", f"data.data_path={data}/records.json",
                         f"data.image_folder={tmp_path}/no_images", "loss_token_budget=0", "data.max_skip_fraction=None")

    def ctrl_c_at_1(step, record):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)  # the handler sets the stop flag: no KeyboardInterrupt

    before = signal.getsignal(signal.SIGINT)
    with caplog.at_level(logging.INFO, logger="manager_jax"):
        result = loop_lib.train(config, on_step=ctrl_c_at_1)
    assert result.status == "stopped" and result.last_step == 2  # stops after the step running then
    assert result.stop_signal == signal.SIGINT
    assert "Ctrl-C received: saving a checkpoint" in caplog.text
    ckpt = Checkpointer(result.checkpoint_dir)
    assert ckpt.all_steps() == [2]
    ckpt.close()
    records = read_metrics(os.path.join(tmp_path, "run", "metrics.jsonl"))
    assert records[0]["data_skips"]["missing_image"] > 0 and set(records[0]["data_skips"]) == {"missing_image"}
    assert records[1]["data_skips"]["missing_image"] >= records[0]["data_skips"]["missing_image"]
    assert "were skipped (missing_image:" in caplog.text
    assert signal.getsignal(signal.SIGINT) is before  # the loop's handler is gone, the caller's is back


def test_a_second_ctrl_c_aborts_at_once():
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    flag = loop_lib._StopFlag()
    flag.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        flag.uninstall()
    assert signal.getsignal(signal.SIGINT) is before


def test_skip_watch_warns_once_when_many_records_are_bad(caplog):
    watch = loop_lib.SkipWatch(max_fraction=0.1, min_records=100)
    with caplog.at_level(logging.WARNING, logger="manager_jax"):
        watch.check({"missing_image": 30}, 60)  # 90 records read: too few to judge
        assert not caplog.records
        watch.check({"bad_record": 2}, 200)  # 1%
        assert not caplog.records
        watch.check({"missing_image": 30, "bad_record": 2}, 100)
        watch.check({"missing_image": 60, "bad_record": 2}, 150)
    assert len(caplog.records) == 1
    assert "32 of the 132 records read so far (24%) were skipped (missing_image: 30, bad_record: 2)" in caplog.text


def test_too_many_skipped_records_stop_the_run_also_after_a_resume(straight_run, tmp_path):
    """A wrong image_folder skips the image records; past data.max_skip_fraction the run stops with
    an error naming the reason and a record, and a resumed run keeps counting from its checkpoint."""
    data = straight_run[0] / "data"
    (tmp_path / "no_images").mkdir()
    wrong = ["synthetic_records=None", f"data.data_path={data}/records.json", f"data.image_folder={tmp_path}/no_images"]
    with pytest.raises(loop_lib.TrainingError, match=(
            r"records read so far \(\d+%\) were skipped as bad, more than data.max_skip_fraction=0.5: "
            r"missing_image: \d+ \(first: record \S+: no file '.*no_images.*'\)")):
        loop_lib.train(demo_config(tmp_path / "fresh", *wrong, "data.skip_check_after=20"))
    assert not os.path.exists(tmp_path / "fresh" / "checkpoints" / "1")  # stopped before wasting steps
    assert read_metrics(os.path.join(tmp_path, "fresh", "metrics.jsonl")) == []

    # Run 1 step with the limit off, then resume with it on: the checkpoint's tally counts.
    loop_lib.train(demo_config(tmp_path / "run", *wrong, "data.max_skip_fraction=None", "num_steps=1"))
    records = read_metrics(os.path.join(tmp_path, "run", "metrics.jsonl"))
    skipped = records[-1]["data_skips"]["missing_image"]
    assert 20 < skipped
    with pytest.raises(loop_lib.TrainingError, match=r"missing_image"):
        loop_lib.train(demo_config(tmp_path / "run", *wrong, f"data.skip_check_after={skipped}"))
    assert Checkpointer(str(tmp_path / "run" / "checkpoints")).all_steps() == [1]


def test_a_run_that_reaches_num_steps_before_the_skip_check_completes_and_saves(straight_run, tmp_path):
    """Below data.skip_check_after records read, with data left (it repeats), the skip fraction is
    not judged: nothing is read after the last step, which used to count as the data run out, so
    such a run stopped with the error before its last checkpoint, at every relaunch."""
    data = straight_run[0] / "data"
    (tmp_path / "no_images").mkdir()
    result = loop_lib.train(demo_config(
        tmp_path / "run", "synthetic_records=None", f"data.data_path={data}/records.json",
        f"data.image_folder={tmp_path}/no_images", "data.skip_check_after=100000", "num_steps=2"))
    assert result.status == "completed"
    assert Checkpointer(str(tmp_path / "run" / "checkpoints")).all_steps() == [2]
    assert read_metrics(os.path.join(tmp_path, "run", "metrics.jsonl"))[-1]["data_skips"]["missing_image"] > 0


def test_a_vocabulary_smaller_than_the_tokenizers_is_refused_before_anything_is_written(tmp_path):
    """It trained NaN from the first step (ids without an embedding row) and exited 0."""
    with pytest.raises(RecipeError, match=r"has \d+ ids but model.text.vocab_size is 100"):
        loop_lib.train(demo_config(tmp_path / "run", "model.text.vocab_size=100"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content, message", [
    ("[]", r"a.json: no records"),
    ('{"id": 1}', r"a.json: expected a JSON array of records, got dict"),
])
def test_an_unusable_data_file_is_an_error_before_anything_is_written(tmp_path, content, message):
    (tmp_path / "a.json").write_text(content)
    config = demo_config(tmp_path / "run", "synthetic_records=None", f"data.data_path={tmp_path}/a.json")
    with pytest.raises(loop_lib.input_errors(), match=message):
        loop_lib.train(config)
    assert not os.path.exists(tmp_path / "run")  # no recipe.json, no checkpoints/config.json


def test_data_that_runs_out_with_every_record_skipped_is_an_error(tmp_path):
    # Fewer records than data.skip_check_after, all bad: once they are all read the share is exact.
    records = [{"id": f"r{i}", "image": "gone.png", "conversations": [{"from": "human", "value": "<image>\nq"},
                                                                     {"from": "gpt", "value": "a"}]} for i in range(5)]
    (tmp_path / "a.json").write_text(json.dumps(records))
    config = demo_config(tmp_path / "run", "synthetic_records=None", f"data.data_path={tmp_path}/a.json",
                         f"data.image_folder={tmp_path}", "data.num_epochs=1")
    with pytest.raises(loop_lib.TrainingError, match=r"5 of the 5 records read so far \(100%\) were skipped as bad.*"
                                                     r"missing_image: 5 \(first: record r\d: no file '.*gone.png'\)"):
        loop_lib.train(config)


def test_resume_refuses_data_that_changed_its_number_of_records(straight_run, tmp_path):
    """The data state holds positions in a shuffled order of N records: over a data file that has
    since grown or shrunk it would silently repeat some records and skip others."""
    records = json.loads((straight_run[0] / "data" / "records.json").read_text())
    data = tmp_path / "records.json"
    data.write_text(json.dumps(records))
    own = ["synthetic_records=None", f"data.data_path={data}", f"data.image_folder={straight_run[0]}/data"]
    loop_lib.train(demo_config(tmp_path / "run", *own, "num_steps=1"))
    data.write_text(json.dumps(records[:-3]))
    recipe = (tmp_path / "run" / "recipe.json").read_text()
    with pytest.raises(RecipeError, match=rf"records in {data}: {len(records)} -> {len(records) - 3} "
                                          r"\(the data changed"):
        loop_lib.train(demo_config(tmp_path / "run", *own, "num_steps=2"))
    assert Checkpointer(str(tmp_path / "run" / "checkpoints")).all_steps() == [1]
    assert (tmp_path / "run" / "recipe.json").read_text() == recipe  # refused before anything is written
    data.write_text(json.dumps(records))  # the same data again: the run continues
    assert loop_lib.train(demo_config(tmp_path / "run", *own, "num_steps=2")).last_step == 2


def test_data_smaller_than_one_step_is_an_error_and_a_used_up_run_resumes_to_nothing(straight_run, tmp_path, caplog):
    """3 records in one epoch cannot fill a step of 4 accumulation steps: the run trained nothing,
    which is a failure, not a completed run with no checkpoint. A run that used its data up and is
    launched again only says so."""
    records = json.loads((straight_run[0] / "data" / "records.json").read_text())
    (tmp_path / "few.json").write_text(json.dumps(records[:3]))
    own = ["synthetic_records=None", f"data.data_path={tmp_path}/few.json", f"data.image_folder={straight_run[0]}/data",
           "data.num_epochs=1", "data.pack=False"]
    with pytest.raises(loop_lib.TrainingError, match=r"the data ran out before the first step: .*few.json does not fill "
                                                     r"one step's batch \(4 rows: 1 shards x 1 rows x 4 accumulation"):
        loop_lib.train(demo_config(tmp_path / "short", *own, "grad_accum=4"))
    result = loop_lib.train(demo_config(tmp_path / "run", *own))
    assert (result.status, result.last_step) == ("data_exhausted", 3)
    with caplog.at_level(logging.WARNING, logger="manager_jax"):
        again = loop_lib.train(demo_config(tmp_path / "run", *own))
    assert (again.status, again.first_step, again.last_step, again.losses) == ("data_exhausted", 3, 3, [])
    assert "the data ran out at step 3 (num_steps 6): nothing to train" in caplog.text


def test_a_resume_from_a_step_with_a_removed_item_is_refused_in_one_line(straight_run, tmp_path):
    """A step directory whose params were removed (or whose metadata is damaged) was resumed and
    failed deep in Orbax with a KeyError traceback."""
    out = _copy_run(straight_run[0], tmp_path / "run")
    shutil.rmtree(out / "checkpoints" / "6" / "params")
    os.remove(out / "checkpoints" / "6" / "data" / "metadata")
    before = _snapshot(out)
    with pytest.raises(FileNotFoundError, match=r"6: the checkpoint of step 6 has no readable params, data \(files "
                                                r"removed or damaged\); remove that step directory to start afresh"):
        loop_lib.train(demo_config(out, "num_steps=8"))
    assert _snapshot(out) == before
    assert FileNotFoundError in loop_lib.input_errors()  # run.py: one error line, exit status 2


def test_a_second_run_into_a_directory_in_use_is_refused_and_the_first_goes_on(straight_run, tmp_path):
    """Two launches into one output_dir both trained, wrote over each other's checkpoints and
    metrics.jsonl (the second's rewrite of it left the first writing to a removed file), and both exited 0."""
    refusals = []

    def launch_again(step, record):
        if step == 2:
            with pytest.raises(RecipeError) as err:  # run.py: one error line, exit status 2
                loop_lib.train(demo_config(tmp_path))
            refusals.append(str(err.value))

    first = loop_lib.train(demo_config(tmp_path), on_step=launch_again)
    assert len(refusals) == 1
    assert f"{tmp_path} is in use by another training run (host {socket.gethostname()}, pid {os.getpid()}, since " \
        in refusals[0] and "use another output_dir" in refusals[0]
    assert first.status == "completed" and first.losses == straight_run[1].losses
    assert [r["step"] for r in read_metrics(os.path.join(tmp_path, "metrics.jsonl"))] == [1, 2, 3, 4, 5, 6]
    # The lock ends with its run (and with its process, however it ends): the next launch resumes.
    again = loop_lib.train(demo_config(tmp_path, "num_steps=7"))
    assert (again.first_step, again.last_step) == (6, 7)


def test_a_signal_during_the_last_step_leaves_a_completed_run(tmp_path):
    """Ctrl-C / SIGTERM while the last step ran: its checkpoint is the final one and a relaunch has
    nothing to train, so the run is complete (exit 0), not "stopped" with 130 / 143."""

    def ctrl_c_at_1(step, record):
        if step == 1:  # read while step 2, the last, runs
            os.kill(os.getpid(), signal.SIGINT)

    result = loop_lib.train(demo_config(tmp_path, "num_steps=2"), on_step=ctrl_c_at_1)
    assert (result.status, result.last_step, result.stop_signal) == ("completed", 2, None)
    ckpt = Checkpointer(result.checkpoint_dir)
    assert ckpt.all_steps() == [2]
    ckpt.close()


def test_a_closed_terminal_saves_and_stops_like_a_preemption(tmp_path):
    """SIGHUP during the steps (the terminal of a run started without nohup closed): a checkpoint
    after the running step and status "stopped", exit 129 from run.py. It used to end the process
    through the start-up handler: no checkpoint, and "outside the training steps"."""

    def hang_up_at_1(step, record):
        if step == 1:  # read while step 2 runs
            os.kill(os.getpid(), signal.SIGHUP)

    result = loop_lib.train(demo_config(tmp_path, "num_steps=4"), on_step=hang_up_at_1)
    assert (result.status, result.last_step, result.stop_signal) == ("stopped", 2, signal.SIGHUP)
    ckpt = Checkpointer(result.checkpoint_dir)
    assert ckpt.all_steps() == [2]
    ckpt.close()
