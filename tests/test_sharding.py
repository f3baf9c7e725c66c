"""Mesh construction and the logical axis rules (every real parameter gets a valid, sensible spec)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from manager_jax.config import preset
from manager_jax.sharding import (
    MeshConfig,
    ShardingError,
    local_shard_indices,
    logical_axes,
    make_mesh,
    path_str,
    spec_for,
    tree_shardings,
)
from manager_jax.train.state import model_abstract

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py)")


def test_mesh_config_fills_one_axis():
    assert MeshConfig(data=2, fsdp=-1, tensor=2).shape(8) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ShardingError, match="needs 4 devices"):
        MeshConfig(data=2, fsdp=2, tensor=1).shape(8)
    with pytest.raises(ShardingError, match="at most one"):
        MeshConfig(data=-1, fsdp=-1).shape(8)
    with pytest.raises(ShardingError, match="cannot fill"):
        MeshConfig(data=3, fsdp=-1).shape(8)


@needs_8
def test_make_mesh_axes_and_subsets():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert mesh.axis_names == ("data", "fsdp", "tensor") and dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    one = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1, num_devices=1))
    assert one.devices.size == 1


class FakeMesh:
    def __init__(self, **shape):
        self.shape = shape


def test_spec_drops_non_dividing_and_repeated_axes():
    mesh = FakeMesh(data=2, fsdp=4, tensor=2)
    assert spec_for(("layers", "embed", "mlp"), (24, 896, 4864), mesh) == P(None, "fsdp", "tensor")
    assert spec_for(("layers", "embed", "kv_heads"), (24, 896, 3), mesh) == P(None, "fsdp")  # 3 % 2 != 0
    assert spec_for(("embed", "embed"), (8, 8), mesh) == P("fsdp")  # fsdp used once
    assert spec_for(("batch", None), (16, 5), mesh) == P(("data", "fsdp"))
    assert spec_for(("norm",), (896,), mesh) == P()


@pytest.mark.parametrize("size, variant", [("0.5b", "grid_manager"), ("7b", "manager"), ("72b", "grid")])
def test_every_parameter_has_a_rule(size, variant):
    """No parameter of the real models falls through to 'replicated by accident'."""
    _, params = model_abstract(preset(size, variant))
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = path_str(path)
        axes = logical_axes(name, leaf.shape)
        assert len(axes) == leaf.ndim, name
        big = np.prod(leaf.shape) >= 1 << 20
        if big:  # every large matrix is FSDP-sharded along some dimension
            assert "embed" in axes or "vision_embed" in axes, (name, axes)
    assert logical_axes("text.layers.attn.q.kernel", (24, 896, 896)) == ("layers", "embed", "heads")
    # Optimizer-state leaves end with their parameter's path and get the same axes.
    assert logical_axes("0.inner_states.language_model.inner_state.0.mu.text.layers.mlp.down.kernel",
                        (24, 4864, 896)) == ("layers", "mlp", "embed")


def test_rank_mismatch_is_an_error():
    with pytest.raises(ShardingError, match="gives 3 axes"):
        logical_axes("text.layers.attn.q.kernel", (896, 896))


@needs_8
def test_tree_shardings_and_local_shards():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    _, params = model_abstract(preset("0.5b", "grid_manager"))
    shardings = tree_shardings(params, mesh)
    assert shardings["text"]["layers"]["mlp"]["gate"]["kernel"].spec == P(None, "fsdp", "tensor")
    assert shardings["text"]["embed"]["embedding"].spec == P("tensor", "fsdp")
    assert shardings["manager"]["blocks"][0]["layer_scores"].spec == P(None, "fsdp")
    assert local_shard_indices(mesh, 8) == list(range(8))  # one process holds every shard
    with pytest.raises(ShardingError, match="multiple of the data-parallel size"):
        local_shard_indices(mesh, 6)
