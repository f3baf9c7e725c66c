"""The training loop with the real data pipeline: exact resume after SIGTERM, NaN aborts, init_from."""

from __future__ import annotations

import json
import os
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from manager_jax.train import loop as loop_lib
from manager_jax.train.checkpointing import Checkpointer
from manager_jax.train.metrics import read_metrics
from manager_jax.train.recipe import load_recipe
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
    assert first.status == "stopped" and first.last_step == 4
    ckpt = Checkpointer(first.checkpoint_dir)
    assert ckpt.all_steps() == [4]
    saved_recipe = ckpt.read_recipe()
    ckpt.close()
    assert saved_recipe == config.to_dict()  # the resolved config travels with the checkpoint
    second = loop_lib.train(demo_config(tmp_path), keep_state=True)
    assert second.first_step == 4 and second.last_step == 6 and second.status == "completed"
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
    with pytest.raises(loop_lib.TrainingError, match="non-finite"):
        loop_lib.train(demo_config(tmp_path, "max_nonfinite_steps=2"))
    events = [json.loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl"))]
    skipped = [e for e in events if e.get("event") == "nonfinite_step_skipped"]
    assert [e["step"] for e in skipped] == [1, 2]


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
    assert result.status == "stopped"
    assert result.losses[0] == pytest.approx(a.losses[0], rel=1e-6)
