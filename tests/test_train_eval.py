"""The held-out evaluation of a training run (`TrainConfig.eval`, train/evaluation.py)."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from manager_jax.data.pipeline import make_train_iterator
from manager_jax.data.tokenizer import load_tokenizer
from manager_jax.train import loop as loop_lib
from manager_jax.train.recipe import RecipeError
from manager_jax.train.state import model_abstract
from tests.test_train_loop import demo_config
from tests.train_batches import compile_cache_fixture

# 13 held-out records over 4 shards (4, 3, 3, 3): shards run out at different steps. One record's
# answer is longer than the demo's loss token budget (96 supervised positions per shard batch), so
# its batch goes to the program without a budget. One device (tests/test_train_multiprocess.py
# evaluates over two processes).
HELD_OUT = ("num_steps=2", "eval.every_steps=1", "batch_shards=4", "loss_chunk_size=256")


def held_out_set(directory) -> tuple[str, str]:
    """(records file, image folder): 12 generated records and a text record with a long answer."""
    from manager_jax.data.synthetic import make_synthetic_dataset

    ds = make_synthetic_dataset(str(directory), num_records=12, seed=7, sizes=[(384, 384), (320, 240)])
    with open(ds.records_path) as f:
        records = json.load(f)
    story = " ".join(f"word{i}" for i in range(150))
    records.insert(5, {"id": "long", "conversations": [{"from": "human", "value": "Tell me a story."},
                                                        {"from": "gpt", "value": story}]})
    with open(ds.records_path, "w") as f:
        json.dump(records, f)
    return ds.records_path, ds.image_folder


@pytest.fixture(scope="module")
def held_out_data(tmp_path_factory):
    path, images = held_out_set(tmp_path_factory.mktemp("held_out_data"))
    return (f"eval.data_path={path}", f"eval.image_folder={images}"), path, images


@pytest.fixture(scope="module")
def held_out_run(tmp_path_factory, held_out_data):
    out = tmp_path_factory.mktemp("held_out")
    config = demo_config(out, *HELD_OUT, *held_out_data[0])
    result = loop_lib.train(config, keep_state=True)
    return out, config, result


def eval_events(directory):
    with open(os.path.join(directory, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("event") == "eval"]


def per_sample_loss(config, params, records_path, image_folder):
    """(mean token cross-entropy, supervised tokens, samples) of the held-out records, each sample
    alone in its own unpacked row, the model on one device, the log-softmax over the whole
    vocabulary in float64 at every supervised position."""
    data = dataclasses.replace(config.data, data_path=records_path, image_folder=image_folder, mixture=None,
                               pack=False, shuffle=False, num_epochs=1, rows_per_host=1)
    graphdef, _ = model_abstract(config.model)
    model = nnx.merge(graphdef, jax.device_get(params))
    hidden_states = jax.jit(model.hidden_states)
    nll_sum, tokens, samples = 0.0, 0, 0
    for batch in make_train_iterator(data, config.model, load_tokenizer(None), process_index=0, process_count=1):
        hidden = np.asarray(hidden_states({k: jnp.asarray(v) for k, v in batch.to_model_inputs().items()}))
        labels, seg = np.asarray(batch.labels), np.asarray(batch.segment_ids)
        # position t predicts labels[t + 1] inside one sample
        valid = np.zeros_like(labels, bool)
        valid[:, :-1] = (labels[:, 1:] != -100) & (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] != 0)
        targets = np.roll(labels, -1, axis=1)[valid]
        logits = np.asarray(model.logits(jnp.asarray(hidden[valid])[None])[0], np.float64)
        top = logits.max(axis=-1)
        logsumexp = top + np.log(np.exp(logits - top[:, None]).sum(axis=-1))
        nll_sum += float((logsumexp - logits[np.arange(len(targets)), targets]).sum())
        tokens += int(valid.sum())
        samples += batch.num_samples
    return nll_sum / tokens, tokens, samples


def test_the_held_out_loss_is_the_mean_over_every_token_of_the_set(held_out_run, held_out_data):
    out, config, result = held_out_run
    assert result.status == "completed"
    events = eval_events(out)
    assert [e["step"] for e in events] == [1, 2]
    last = events[-1]
    _, path, images = held_out_data
    loss, tokens, samples = per_sample_loss(config, result.state["params"], path, images)
    assert samples == 13 and last["samples"] == 13
    assert last["tokens"] == tokens
    assert last["loss"] == pytest.approx(loss, rel=2e-5)
    assert last["skipped"] == {}
    # the evaluation after step 1 saw other params
    assert events[0]["loss"] != last["loss"]


def test_max_batches_limits_the_evaluation_and_the_training_is_unchanged(held_out_run, held_out_data, tmp_path):
    out, _, full = held_out_run
    result = loop_lib.train(demo_config(tmp_path, *HELD_OUT, *held_out_data[0], "eval.max_batches=1"))
    first = eval_events(tmp_path)[-1]
    assert first["batches"] == 1
    assert 0 < first["tokens"] < eval_events(out)[-1]["tokens"]
    assert result.losses == full.losses  # evaluating draws nothing from the training's data or randomness


def test_the_demo_generates_a_held_out_set_of_its_own(tmp_path):
    loop_lib.train(demo_config(tmp_path, "num_steps=1", "eval.synthetic_records=3"))
    (event,) = eval_events(tmp_path)
    assert event["samples"] == 3 and event["tokens"] > 0
    with open(tmp_path / "data" / "eval" / "records.json") as f:
        held_out = json.load(f)
    with open(tmp_path / "data" / "records.json") as f:
        assert len(held_out) == 3 and held_out != json.load(f)[:3]  # drawn with another seed


def test_a_held_out_set_with_bad_records_is_evaluated_without_them(tmp_path):
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 30, 30)).save(eval_dir / "red.png")
    turns = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}]
    records = [{"id": "good", "image": "red.png", "conversations": turns},
               {"id": "lost", "image": "missing.png", "conversations": turns},
               {"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}]
    (eval_dir / "held_out.json").write_text(json.dumps(records))
    out = tmp_path / "run"
    loop_lib.train(demo_config(out, "num_steps=1", f"eval.data_path={eval_dir / 'held_out.json'}",
                               f"eval.image_folder={eval_dir}"))
    (event,) = eval_events(out)
    assert event["samples"] == 2 and event["tokens"] > 0
    assert sum(event["skipped"].values()) == 1


@pytest.mark.parametrize("overrides, message", [
    (("eval.data_path=nowhere/held_out.json",), "eval.data_path: nowhere/held_out.json: not found"),
    (("eval.every_steps=-1", "eval.synthetic_records=4"), "eval.every_steps must be >= 0"),
    (("eval.synthetic_records=4", "eval.mixture=m.yaml"), "give one source of the held-out set"),
])
def test_a_bad_eval_config_is_refused_before_anything_is_written(tmp_path, overrides, message):
    out = tmp_path / "run"
    with pytest.raises(RecipeError, match=message):
        loop_lib.train(demo_config(out, *overrides))
    assert not out.exists()
