"""Checkpointer: a save that fails in the background is reported under its own step, and the
checkpoints before it stay complete and restorable (a disk-full save is the case in practice;
here the JSON item cannot be written, which fails in the same background commit)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from manager_jax.train.checkpointing import Checkpointer, CheckpointSaveError

UNWRITABLE = [{"positions": {1, 2}}]  # a set: not JSON


def _state(value: float) -> dict:
    return {"params": {"w": jnp.full((64,), value)}, "opt_state": {"m": jnp.zeros((64,))},
            "step": jnp.int32(value), "rng": jnp.zeros((2,), jnp.uint32)}


def test_a_failed_background_save_is_reported_with_its_step_and_the_last_good_one_restores(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "ck"), keep=3, async_save=True)
    try:
        ckpt.save(1, _state(1.0), [{}], {"run": 1})
        assert ckpt.save_error(wait=True) is None
        ckpt.save(2, _state(2.0), UNWRITABLE, {"run": 1})
        deadline = time.monotonic() + 30
        while (error := ckpt.save_error()) is None and time.monotonic() < deadline:  # as the loop asks each step
            time.sleep(0.05)
        assert error is not None and "step 2" in error and "not JSON serializable" in error
        assert ckpt.save_error() is None  # said once
        assert ckpt.all_steps() == [1]  # the partial step 2 is not a checkpoint
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0.0))
        state, data, _ = ckpt.restore(1, abstract)
        np.testing.assert_array_equal(np.asarray(state["params"]["w"]), 1.0)
        assert data == [{}]
    finally:
        ckpt.close()


def test_the_next_save_names_the_step_whose_save_failed(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "ck"), keep=3, async_save=True)
    try:
        ckpt.save(4, _state(4.0), UNWRITABLE, {"run": 1})
        with pytest.raises(CheckpointSaveError, match="step 4 in .* failed"):
            ckpt.save(5, _state(5.0), [{}], {"run": 1})
    finally:
        ckpt.close()
