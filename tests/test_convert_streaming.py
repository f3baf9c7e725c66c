"""Conversion memory is bounded by a tensor, not the model: to-orbax writes each parameter layer by
layer as it is read, from-orbax reads one stored chunk at a time."""

from __future__ import annotations

import tracemalloc
import weakref

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from safetensors.torch import load_file

from manager_jax import params_io
from manager_jax.config import TextConfig, tiny
from manager_jax.sharding import MeshConfig, make_mesh, tree_shardings
from manager_jax.train import checkpointing
from tools.convert_weights import convert, mapping, testing
from tools.convert_weights.orbax_io import OrbaxSource


@pytest.mark.parametrize("budget_pieces", [0, 2])
def test_streamed_leaves_hold_at_most_the_bytes_in_flight(tmp_path, monkeypatch, budget_pieces):
    layers, alive, most_alive = 6, [], []
    piece_bytes = 3 * 5 * 4
    monkeypatch.setattr(params_io, "STREAM_BYTES_IN_FLIGHT", budget_pieces * piece_bytes)

    def read(i):
        alive[:] = [r for r in alive if r() is not None]
        most_alive.append(len(alive))  # earlier pieces still held when the next one is asked for
        piece = np.full((3, 5), i, np.float32)  # written as it is (no cast): its lifetime is the writer's
        alive.append(weakref.ref(piece))
        return piece

    bf16 = np.dtype(ml_dtypes.bfloat16)
    tree = {"stack": params_io.StreamedArray((layers, 3, 5), np.dtype(np.float32), read, layered=True),
            "cast": params_io.StreamedArray((layers, 3, 5), bf16, lambda i: np.full((3, 5), i, np.float32),
                                            layered=True),
            "bias": params_io.StreamedArray((4,), np.dtype(np.float32), lambda i: np.arange(4.0)),
            "plain": np.ones((2, 2), np.float32)}
    params_io.save_tree(str(tmp_path / "p"), tree)
    assert max(most_alive) == budget_pieces  # reading runs ahead of writing by the budget, no further
    back = params_io.restore_tree(str(tmp_path / "p"))
    assert back["cast"].dtype == bf16
    for name in ("stack", "cast"):
        np.testing.assert_array_equal(back[name].astype(np.float32),
                                      np.arange(layers)[:, None, None] * np.ones((3, 5)))
    np.testing.assert_array_equal(back["bias"], np.arange(4.0))
    np.testing.assert_array_equal(back["plain"], tree["plain"])
    # One layer per stored chunk, so a reader can take one layer without the others.
    store = params_io.open_stored_array(str(tmp_path / "p"), ("stack",))
    assert tuple(store.chunk_layout.read_chunk.shape) == (1, 3, 5)


def _wide_config():
    """8 text layers of 1 MB matrices: the model is many times its largest tensor."""
    cfg = tiny("baseline")
    t = cfg.text
    text = TextConfig(**{**t.__dict__, "hidden_size": 256, "intermediate_size": 1024, "num_layers": 8,
                         "num_heads": 4, "num_kv_heads": 2, "head_dim": 64})
    return cfg.replace(text=text)


def test_to_orbax_holds_about_one_tensor(tmp_path):
    cfg = _wide_config()
    tensors, _, _ = testing.write_original_checkpoint(str(tmp_path / "src"), cfg, dtype=torch.float32, num_shards=2)
    model_bytes = sum(t.numel() * 4 for t in tensors.values())
    largest = max(t.numel() * 4 for t in tensors.values())
    assert model_bytes > 20 * largest
    params_io.abstract_params(cfg)  # its one-time tracing is not what is measured
    tracemalloc.start()
    try:
        convert.to_orbax(str(tmp_path / "src"), str(tmp_path / "orbax"))
        to_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Before streaming, to-orbax held the whole tree (peak 33.9 MB for this 33.2 MB model; now 0.7 MB).
    # (from-orbax's reads are TensorStore buffers, which tracemalloc does not see.)
    assert to_peak < model_bytes / 4, (to_peak, model_bytes)
    convert.from_orbax(str(tmp_path / "orbax"), str(tmp_path / "back"), fmt="llava")
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(back) == set(tensors)
    for key, value in tensors.items():
        assert torch.equal(back[key], value), key


def test_orbax_source_reads_a_layer_of_either_chunk_layout(tmp_path):
    """Per-layer chunks (to-orbax) and one chunk for the whole stack (numpy saves, training)."""
    cfg = tiny("grid_manager")
    rng = np.random.default_rng(0)
    tree: dict = {}
    for spec in mapping.param_specs(cfg):
        mapping.set_path(tree, spec.path, rng.standard_normal(spec.shape).astype(np.float32))
    params_io.save_params(str(tmp_path / "whole"), tree, cfg)
    streamed = {}
    for path, value in mapping.flatten(tree).items():
        mapping.set_path(streamed, path, params_io.StreamedArray(
            value.shape, value.dtype, (lambda v: lambda i: v if i is None else v[i])(value), layered=value.ndim > 2))
    params_io.save_params(str(tmp_path / "layered"), streamed, cfg)
    for name in ("whole", "layered"):
        source = OrbaxSource(str(tmp_path / name))
        for spec in source.specs:
            want = mapping.get_path(tree, spec.path)
            if spec.stack:
                for i in (2, 0, spec.shape[0] - 1):
                    np.testing.assert_array_equal(source.read(spec.path, i), want[i], err_msg=f"{name} {spec.dotted}")
            else:
                np.testing.assert_array_equal(source.read(spec.path), want, err_msg=f"{name} {spec.dotted}")


def _file_bytes_read() -> int:
    """Bytes TensorStore has read from local files so far (its own counter: what the reads cost)."""
    import tensorstore as ts

    return sum(int(v["value"]) for m in ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/bytes_read")
               for v in m["values"])


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py sets 8 fake CPU devices)")
@pytest.mark.parametrize("layout", ["layer_per_chunk", "stack_per_chunk"])
def test_a_training_checkpoint_exports_reading_one_layer_at_a_time(tmp_path, monkeypatch, layout):
    cfg = _wide_config()
    tensors, _, _ = testing.write_original_checkpoint(str(tmp_path / "src"), cfg, dtype=torch.float32)
    convert.to_orbax(str(tmp_path / "src"), str(tmp_path / "orbax"))
    _, params = params_io.load_params(str(tmp_path / "orbax"))
    if layout == "stack_per_chunk":  # checkpoints written before per-layer chunks: Orbax's default layout
        monkeypatch.setattr(checkpointing, "_save_args", lambda tree: jax.tree.map(lambda _: ocp.SaveArgs(), tree))
    mesh = make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
    state = {"params": jax.device_put(params, tree_shardings(params, mesh)), "opt_state": {"count": jnp.int32(0)},
             "step": jnp.int32(5), "rng": jnp.zeros((2,), jnp.uint32)}
    ckpt = checkpointing.Checkpointer(str(tmp_path / "ck"), async_save=False)
    ckpt.write_model_config(cfg)
    ckpt.save(5, state, [{}], {})
    ckpt.close()

    # What from-orbax reads for each layer of the largest stacked parameter.
    path = ("text", "layers", "mlp", "up", "kernel")
    stack = mapping.get_path(params, path)
    layer_bytes = stack[0].nbytes
    source = OrbaxSource(str(tmp_path / "ck"))
    read = []
    for i in range(stack.shape[0]):
        before = _file_bytes_read()
        np.testing.assert_array_equal(source.read(path, i), stack[i])
        read.append(_file_bytes_read() - before)
    if layout == "layer_per_chunk":
        assert max(read) < 1.2 * layer_bytes, (read, layer_bytes)
    else:  # read whole once, then served from the cached block
        assert read[0] > 0.8 * stack.nbytes and sum(read[1:]) < layer_bytes, (read, layer_bytes)

    convert.from_orbax(str(tmp_path / "ck"), str(tmp_path / "back"), fmt="llava")
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(back) == set(tensors)
    for key, value in tensors.items():
        assert torch.equal(back[key], value), key
