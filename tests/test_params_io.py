"""Params directories: atomic save, load (numpy, dtype cast, sharded onto a mesh), training checkpoints."""

from __future__ import annotations

import os

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from manager_jax import params_io
from manager_jax.config import tiny
from tools.convert_weights import mapping


def random_tree(cfg, seed=0, dtype=np.float32) -> dict:
    rng = np.random.default_rng(seed)
    tree: dict = {}
    for spec in mapping.param_specs(cfg):
        mapping.set_path(tree, spec.path, rng.standard_normal(spec.shape).astype(dtype))
    return tree


def assert_trees_equal(a, b):
    fa, fb = mapping.flatten(a), mapping.flatten(b)
    assert set(fa) == set(fb)
    for k in fa:
        assert np.asarray(fa[k]).dtype == np.asarray(fb[k]).dtype, k
        assert np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])), k


@pytest.fixture(scope="module")
def cfg():
    return tiny("grid_manager")


def test_save_load_roundtrip(tmp_path, cfg):
    tree = random_tree(cfg, dtype=ml_dtypes.bfloat16)
    out = params_io.save_params(str(tmp_path / "p"), tree, cfg, extra_files={"notes/a.txt": b"hello"})
    assert sorted(os.listdir(out)) == ["config.json", "notes", "params"]
    loaded_cfg, loaded = params_io.load_params(out)
    assert loaded_cfg == cfg
    assert_trees_equal(loaded, tree)
    assert isinstance(next(iter(loaded["manager"]["blocks"])), int)  # nnx.List indices


def test_a_checkpoint_removed_while_read_is_named_so_in_one_short_line(tmp_path, cfg, monkeypatch):
    """A training run with checkpoint.keep deletes an old step while `score` reads it: Orbax's real
    error, cut to one line of bounded length, says it was removed (not "damaged"), to run again."""
    import shutil

    out = params_io.save_params(str(tmp_path / "p"), random_tree(cfg), cfg)
    handler = params_io._handler

    def removed_then_handler():
        shutil.rmtree(out)  # as the trainer's cleanup does: after our checks, as Orbax starts reading
        return handler()

    monkeypatch.setattr(params_io, "_handler", removed_then_handler)
    with pytest.raises(params_io.ParamsError) as info:
        params_io.load_params(out)
    message = str(info.value)
    assert "\n" not in message and len(message) < len(out) + 600, message
    assert message.endswith("it was removed while being read (a training run replacing its older steps?): run again "
                            "to read the newest")


def test_load_with_dtype_and_onto_a_mesh(tmp_path, cfg):
    tree = random_tree(cfg)
    params_io.save_params(str(tmp_path / "p"), tree, cfg)
    _, as_bf16 = params_io.load_params(str(tmp_path / "p"), dtype="bfloat16")
    assert as_bf16["text"]["embed"]["embedding"].dtype == ml_dtypes.bfloat16
    devices = np.array(jax.devices()[:4]).reshape(2, 2)
    mesh = jax.sharding.Mesh(devices, ("fsdp", "tensor"))

    def sharding_for(leaf):
        spec = P("fsdp") if leaf.shape[0] % 2 == 0 else P()
        return jax.ShapeDtypeStruct(leaf.shape, np.float32, sharding=NamedSharding(mesh, spec))

    target = jax.tree_util.tree_map(sharding_for, params_io.abstract_params(cfg))
    _, sharded = params_io.load_params(str(tmp_path / "p"), target=target)
    emb = sharded["text"]["embed"]["embedding"]
    assert isinstance(emb, jax.Array) and emb.sharding.spec == P("fsdp")
    assert len(emb.addressable_shards) == 4 and emb.addressable_shards[0].data.shape[0] == emb.shape[0] // 2
    assert_trees_equal(jax.tree_util.tree_map(np.asarray, sharded), tree)


def test_save_rejects_a_tree_that_does_not_fit_the_model(tmp_path, cfg):
    tree = random_tree(cfg)
    tree["text"]["norm"]["scale"] = np.zeros(7, np.float32)
    del tree["image_newline"]
    tree["extra"] = np.zeros(2, np.float32)
    with pytest.raises(params_io.ParamsError) as err:
        params_io.save_params(str(tmp_path / "p"), tree, cfg)
    msg = str(err.value)
    assert "missing parameter image_newline [64]" in msg
    assert "unexpected parameter extra [2]" in msg
    assert "parameter text.norm.scale has shape [7], expected [64]" in msg
    assert os.listdir(tmp_path) == []


def test_failed_save_leaves_no_directory_and_keeps_the_old_one(tmp_path, cfg):
    params_io.save_params(str(tmp_path / "p"), random_tree(cfg, seed=1), cfg)
    with pytest.raises(FileNotFoundError):
        params_io.save_params(str(tmp_path / "p"), random_tree(cfg, seed=2), cfg, overwrite=True,
                              extra_files={"x": str(tmp_path / "no-such-file")})
    assert sorted(os.listdir(tmp_path)) == ["p"]  # no temporary leftovers
    _, kept = params_io.load_params(str(tmp_path / "p"))
    assert_trees_equal(kept, random_tree(cfg, seed=1))
    with pytest.raises(params_io.ParamsError, match="already exists"):
        params_io.save_params(str(tmp_path / "p"), random_tree(cfg), cfg)


def test_training_checkpoint_latest_step(tmp_path, cfg):
    root = tmp_path / "run"
    trees = {step: random_tree(cfg, seed=step) for step in (3, 10)}
    with ocp.CheckpointManager(str(root), item_names=("params",)) as mngr:
        for step, tree in trees.items():
            mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(tree)))
        mngr.wait_until_finished()
    cfg.save(str(root / "config.json"))
    item, cfg_path = params_io.resolve_params_dir(str(root))
    assert os.path.basename(os.path.dirname(item)) == "10"
    loaded_cfg, loaded = params_io.load_params(str(root))
    assert loaded_cfg == cfg
    assert_trees_equal(loaded, trees[10])


def test_one_step_of_a_training_run_loads_with_the_runs_config(tmp_path, cfg):
    """An earlier step named directly (`generate --checkpoint run/checkpoints/3`): its config.json is
    the run's, one level up (it was refused for want of one in the step directory)."""
    trees = _training_run(tmp_path / "run", cfg)
    loaded_cfg, loaded = params_io.load_params(str(tmp_path / "run" / "3"))
    assert loaded_cfg == cfg
    assert_trees_equal(loaded, trees[3])


def test_nnx_state_with_value_wrappers(tmp_path, cfg):
    """A tree saved as {..., "kernel": {"value": array}} (nnx.State without to_pure_dict) reads as pure."""
    tree = random_tree(cfg)
    wrapped = jax.tree_util.tree_map(lambda x: {"value": x}, tree)
    params_io.save_tree(str(tmp_path / "run" / "7" / "params"), wrapped)
    cfg.save(str(tmp_path / "run" / "config.json"))
    _, loaded = params_io.load_params(str(tmp_path / "run"))
    assert_trees_equal(loaded, tree)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(params_io.ParamsError, match="neither a params directory"):
        params_io.load_params(str(tmp_path))


def test_restore_into_model_and_shape_errors(cfg):
    from flax import nnx

    from manager_jax.models.llava_ov import LlavaOV

    model = LlavaOV(cfg, rngs=nnx.Rngs(0))
    tree = random_tree(cfg, seed=5)
    params_io.restore_into(model, tree)
    np.testing.assert_array_equal(np.asarray(model.manager.blocks[1].layer_scores[...]),
                                  tree["manager"]["blocks"][1]["layer_scores"])
    np.testing.assert_array_equal(np.asarray(model.vision.layers.mlp.fc2.kernel[...]),
                                  tree["vision"]["layers"]["mlp"]["fc2"]["kernel"])
    tree["projector"]["linear1"]["bias"] = np.zeros(3, np.float32)
    with pytest.raises(params_io.ParamsError, match="projector.linear1.bias has shape"):
        params_io.restore_into(model, tree)


def test_training_output_dir_resolves_to_its_latest_checkpoint(tmp_path):
    from manager_jax.params_io import resolve_params_dir

    for step in (10, 20):
        (tmp_path / "checkpoints" / str(step) / "params").mkdir(parents=True)
    (tmp_path / "checkpoints" / "config.json").write_text("{}")
    params, cfg = resolve_params_dir(str(tmp_path))
    assert params == str(tmp_path / "checkpoints" / "20" / "params")
    assert cfg == str(tmp_path / "checkpoints" / "config.json")


def _fill_with(text):
    def fill(tmp):
        with open(os.path.join(tmp, "f.txt"), "w") as f:
            f.write(text)

    return fill


def test_overwrite_refuses_to_replace_its_own_source(tmp_path, cfg):
    src = params_io.save_params(str(tmp_path / "run" / "p"), random_tree(cfg, seed=1), cfg)
    cases = [
        (src, [src]),  # the destination is the source
        (str(tmp_path / "run"), [src]),  # it contains the source
        (os.path.join(src, "params"), [src]),  # it lies inside the source
        (src + "/", [os.path.join(str(tmp_path), "run", ".", "p")]),  # spelled differently
    ]
    os.symlink(src, tmp_path / "link")
    cases.append((str(tmp_path / "link"), [src]))  # a symlink to it
    for dst, sources in cases:
        with pytest.raises(params_io.ParamsError, match="refusing to overwrite"):
            params_io.write_atomically(dst, _fill_with("x"), overwrite=True, sources=sources)
        with pytest.raises(params_io.ParamsError, match="refusing to overwrite"):
            params_io.save_params(dst, random_tree(cfg), cfg, overwrite=True, sources=sources)
    _, kept = params_io.load_params(src)
    assert_trees_equal(kept, random_tree(cfg, seed=1))
    assert sorted(os.listdir(tmp_path)) == ["link", "run"] and os.listdir(tmp_path / "run") == ["p"]
    # A destination beside the source is replaced as before.
    (tmp_path / "other").mkdir()
    params_io.write_atomically(str(tmp_path / "other"), _fill_with("y"), overwrite=True, sources=[src])
    assert (tmp_path / "other" / "f.txt").read_text() == "y"


def test_overwriting_a_plain_file_leaves_no_hidden_copy(tmp_path):
    (tmp_path / "afile").write_text("old")
    params_io.write_atomically(str(tmp_path / "afile"), _fill_with("new"), overwrite=True)
    assert os.listdir(tmp_path) == ["afile"]
    assert (tmp_path / "afile" / "f.txt").read_text() == "new"


# Ctrl-C's handler in the writer, as in a terminal: a shell's background job (a CI wrapper started
# with `&`) passes SIGINT on ignored, and Python then installs none. Set in the child, not by a
# preexec_fn: that forks this multithreaded JAX process.
_SLOW_WRITE = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
from manager_jax import params_io

def fill(tmp):
    with open(os.path.join(tmp, "part.bin"), "wb") as f:
        f.write(b"x" * 1000)
    open(sys.argv[2], "w").close()  # tells the test that the temporary directory exists
    time.sleep(60)

params_io.write_atomically(sys.argv[1], fill, overwrite=False)
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_a_signal_while_writing_removes_the_temporary_directory(tmp_path, sig):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    out.mkdir()
    ready = tmp_path / "ready"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with subprocess.Popen([sys.executable, "-c", _SLOW_WRITE, str(out / "dst"), str(ready)], cwd=repo,
                          stderr=subprocess.PIPE, text=True) as proc:  # closes its stderr pipe
        try:
            deadline = time.time() + 120
            while not ready.exists():
                assert proc.poll() is None, proc.stderr.read()
                assert time.time() < deadline, "the writer never started"
                time.sleep(0.1)
            assert len(os.listdir(out)) == 1 and os.listdir(out)[0].startswith(".dst.tmp-")
            proc.send_signal(getattr(signal, sig))
            proc.wait(timeout=60)
        finally:
            proc.kill()
    assert proc.returncode != 0
    if sig != "SIGINT":
        assert proc.returncode == 128 + getattr(signal, sig)
    assert os.listdir(out) == []


def _training_run(root, cfg, steps=(3, 10)):
    trees = {step: random_tree(cfg, seed=step) for step in steps}
    with ocp.CheckpointManager(str(root), item_names=("params",)) as mngr:
        for step, tree in trees.items():
            mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(tree)))
        mngr.wait_until_finished()
    cfg.save(str(root / "config.json"))
    return trees


def test_unfinished_newer_steps_are_skipped_and_logged(tmp_path, cfg, caplog):
    """A step whose save was interrupted (params/ with only _METADATA, no commit marker) or that has
    no params item: the newest committed step is used, and a log line says which and why."""
    import shutil

    root = tmp_path / "run"
    trees = _training_run(root, cfg)
    (root / "20" / "params").mkdir(parents=True)
    shutil.copy(root / "10" / "params" / "_METADATA", root / "20" / "params" / "_METADATA")
    (root / "30").mkdir()
    with caplog.at_level("WARNING", logger="manager_jax.params_io"):
        _, loaded = params_io.load_params(str(root))
    assert_trees_equal(loaded, trees[10])
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "using step 10" in logged and "step 20 is not committed" in logged and "step 30 has no 'params' item" in logged


# Orbax failing on a damaged checkpoint prints "Event loop is closed" tracebacks from its threads
# (seen by pytest as unraisable exceptions): the files are checked before Orbax reads them.
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_damaged_checkpoints_raise_params_errors(tmp_path, cfg):
    import shutil

    root = tmp_path / "run"
    _training_run(root, cfg, steps=(5,))
    shutil.rmtree(root / "5" / "params" / "d")  # a committed step whose array files are gone
    with pytest.raises(params_io.ParamsError, match=r"holds no readable Orbax checkpoint \(missing d\)"):
        params_io.load_params(str(root))
    empty = tmp_path / "empty"
    (empty / "params").mkdir(parents=True)
    cfg.save(str(empty / "config.json"))
    with pytest.raises(params_io.ParamsError, match="holds no readable Orbax checkpoint"):
        params_io.load_params(str(empty))
    with pytest.raises(params_io.ParamsError, match="holds no readable Orbax checkpoint"):
        params_io.tree_metadata(str(empty / "params"))
    (empty / "config.json").write_text("{not json")
    with pytest.raises(params_io.ParamsError, match="config.json: not valid JSON"):
        params_io.load_config(str(empty))
    with pytest.raises(params_io.ParamsError, match="config.json: not valid JSON"):
        params_io.load_params(str(empty))


def test_a_pytorch_checkpoint_dir_gets_a_conversion_hint(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(params_io.ParamsError, match="convert_weights to-orbax"):
        params_io.resolve_params_dir(str(tmp_path))
