"""Checkpointer: a save that fails in the background is reported under its own step, and the
checkpoints before it stay complete and restorable (a disk-full save is the case in practice;
here the JSON item cannot be written, which fails in the same background commit). Stacked layer
leaves are stored a layer per chunk and restore bit for bit on other meshes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from manager_jax import params_io
from manager_jax.sharding import MeshConfig, logical_axes, make_mesh, path_str
from manager_jax.train.checkpointing import Checkpointer, CheckpointSaveError, flatten_tree
from manager_jax.train.optimizer import OptimConfig
from manager_jax.train.state import make_setup
from manager_jax.train.step import LossConfig
from tests.train_batches import small_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


# A run killed (kill -9) while its step 4 is written in the background: step 2 is complete.
_KILLED_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys
    import jax.numpy as jnp
    from manager_jax.train.checkpointing import Checkpointer
    def state(v):
        return {"params": {"w": jnp.full((1 << 23,), v)}, "opt_state": {"m": jnp.zeros((1 << 23,))},
                "step": jnp.int32(v), "rng": jnp.zeros((2,), jnp.uint32)}
    ckpt = Checkpointer(sys.argv[1], keep=3)
    ckpt.save(2, state(2.0), [{}], {"run": 1})
    ckpt.wait()
    ckpt.save(4, state(4.0), [{}], {"run": 1})
    while not any(name.startswith("4.") for name in os.listdir(sys.argv[1])):  # its write has begun
        pass
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_the_partial_step_of_a_killed_save_is_no_checkpoint_and_is_removed_when_the_run_goes_on(tmp_path):
    """The temporary directory of a save cut short by kill -9 stayed forever when the relaunched run
    did not save that same step again (another every_steps, a SIGTERM save): a checkpoint's size of disk."""
    directory = str(tmp_path / "ck")
    proc = subprocess.run([sys.executable, "-c", _KILLED_DURING_SAVE, directory], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    leftover = [name for name in os.listdir(directory) if name.startswith("4.")]
    assert leftover and "4" not in os.listdir(directory), os.listdir(directory)  # killed while step 4 was written
    ckpt = Checkpointer(directory, keep=3)
    try:
        assert ckpt.all_steps() == [2]
        ckpt.save(3, _state(3.0), [{}], {"run": 1})
        assert ckpt.save_error(wait=True) is None
        assert sorted(os.listdir(directory)) == ["2", "3"]
    finally:
        ckpt.close()


# A disk that fills up after step 2 was saved (a file size limit stands in for it: writes past
# 100 KB fail with EFBIG, as they would with ENOSPC).
_DISK_FULL_AT_STEP_4 = textwrap.dedent("""
    import resource, signal, sys
    import jax
    from manager_jax.train.checkpointing import Checkpointer
    def state(v):
        noise = lambda k: jax.random.normal(jax.random.key(k), (1 << 20,))  # 4 MB that do not compress
        return {"params": {"w": noise(v), "b": noise(v + 1)}, "opt_state": {"m": noise(v + 2)},
                "step": jax.numpy.int32(v), "rng": jax.numpy.zeros((2,), jax.numpy.uint32)}
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    ckpt = Checkpointer(sys.argv[1], keep=3)
    ckpt.save(2, state(2), [{}], {"run": 1})
    assert ckpt.save_error(wait=True) is None
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    ckpt.save(4, state(4), [{}], {"run": 1})
    print("completed before:", ckpt.take_completed())
    print("error:", ckpt.save_error(wait=True), file=sys.stderr)
    print("completed after:", ckpt.take_completed())
    ckpt.close()
""")


def test_a_save_on_a_full_disk_is_one_line_naming_the_cause_and_the_step_to_resume_from(tmp_path):
    """Orbax logged the failure with its traceback from every writer and commit thread, and late
    tensorstore callbacks printed theirs: 50 to 130 tracebacks before the one error line."""
    directory = str(tmp_path / "ck")
    proc = subprocess.run([sys.executable, "-c", _DISK_FULL_AT_STEP_4, directory], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ERROR" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: saving the checkpoint of step 4 in {directory} failed: File too large (EFBIG); "
                      "the earlier checkpoints there are complete (the next launch resumes from step 2)"]
    # Step 2 is reported complete (once), the failed step 4 never: the loop's "checkpoint" events.
    assert proc.stdout.splitlines() == ["completed before: 2", "completed after: None"], proc.stdout
    ckpt = Checkpointer(directory, keep=3)
    try:
        assert ckpt.all_steps() == [2]
        abstract = {"params": {"w": jax.ShapeDtypeStruct((1 << 20,), jnp.float32),
                               "b": jax.ShapeDtypeStruct((1 << 20,), jnp.float32)},
                    "opt_state": {"m": jax.ShapeDtypeStruct((1 << 20,), jnp.float32)},
                    "step": jax.ShapeDtypeStruct((), jnp.int32), "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
        state, _, _ = ckpt.restore(2, abstract)
        np.testing.assert_array_equal(np.asarray(state["params"]["w"]),
                                      np.asarray(jax.random.normal(jax.random.key(2), (1 << 20,))))
    finally:
        ckpt.close()


def _stored_chunk(item: str, key: tuple) -> tuple:
    return tuple(params_io.open_stored_array(item, key).chunk_layout.read_chunk.shape)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py sets 8 fake CPU devices)")
def test_stacked_leaves_are_stored_a_layer_per_chunk_inside_each_shard_and_restore_on_other_meshes(tmp_path):
    cfg = small_model("manager")
    # Orbax splits a shard between its data-axis replicas on the first axis they divide (here the
    # layers): 4 layers over 2 replicas still made chunks of 2 layers before per-layer chunking.
    cfg.text.num_layers = 4
    cfg.validate()
    tunable = "mm_mlp_adapter,mm_manager,mm_language_model"  # stacked decoder moments in opt_state

    def setup_on(mesh_config):
        return make_setup(cfg, make_mesh(mesh_config), tunable_parts=tunable, optim=OptimConfig(),
                          total_steps=10, loss=LossConfig())

    written = setup_on(MeshConfig(data=2, fsdp=4, tensor=1))
    # Every leaf random (fresh moments would be zeros), so a restore that mixed up layers or shards shows.
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda s: jax.device_put(rng.standard_normal(s.shape).astype(s.dtype), s.sharding),
                         written.abstract_state)
    ckpt = Checkpointer(str(tmp_path / "ck"), async_save=False)
    ckpt.save(3, state, [{"shard": 0}], {"run": 1})
    ckpt.close()

    stacked = 0
    for item, tree in (("params", state["params"]), ("opt_state", flatten_tree(state["opt_state"]))):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if not leaf.ndim:
                continue
            shard = leaf.addressable_shards[0].data.shape
            chunk = _stored_chunk(str(tmp_path / "ck" / "3" / item), tuple(str(k.key) for k in path))
            # Chunks tile each device's shard: every process writes whole chunks of its own data.
            assert all(s % c == 0 for s, c in zip(shard, chunk)), (path_str(path), chunk, shard)
            if logical_axes(path_str(path), leaf.shape)[:1] == ("layers",):
                stacked += 1
                assert chunk[0] == 1, (path_str(path), chunk)
    assert stacked > 20  # decoder and tower params, decoder moments

    for mesh_config in (MeshConfig(data=1, fsdp=4, tensor=2), MeshConfig(data=1, fsdp=8, tensor=1)):
        target = setup_on(mesh_config)
        restored, data, recipe = Checkpointer(str(tmp_path / "ck")).restore(3, target.abstract_state)
        assert data == [{"shard": 0}] and recipe == {"run": 1}
        want = jax.tree_util.tree_flatten_with_path(state)[0]
        got, places = jax.tree.leaves(restored), jax.tree.leaves(target.abstract_state)
        assert len(got) == len(want) == len(places)
        for (path, x), y, place in zip(want, got, places):
            assert y.sharding == place.sharding, path_str(path)
            np.testing.assert_array_equal(np.asarray(y), np.asarray(x), err_msg=path_str(path))  # bit for bit
