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


def _recipe_setup(recipe: str, data: int, fsdp: int, tensor: int):
    """The train state's shapes and shardings of a recipe on a mesh of that shape (no devices needed)."""
    from jax.sharding import AbstractMesh

    from manager_jax.train.recipe import load_recipe
    from manager_jax.train.state import make_setup
    from manager_jax.train.step import LossConfig

    config = load_recipe(f"configs/llava_ov.py:{recipe}")
    mesh = AbstractMesh((data, fsdp, tensor), ("data", "fsdp", "tensor"))
    return make_setup(config.model, mesh, tunable_parts=config.tunable_parts, optim=config.optim,
                      total_steps=10, loss=LossConfig())


def _state_bytes(tree) -> tuple[int, int]:
    """(whole, one device's share) of a tree of sharded ShapeDtypeStructs."""
    whole = per_device = 0
    for leaf in jax.tree.leaves(tree):
        whole += int(np.prod(leaf.shape)) * leaf.dtype.itemsize
        per_device += int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
    return whole, per_device


@pytest.mark.parametrize("size, mesh", [("0.5b", (1, 64, 1)), ("7b", (2, 16, 2)), ("72b", (1, 16, 8))])
@pytest.mark.parametrize("stage", ["1", "2"])
def test_recipe_states_are_split_over_fsdp_and_tensor(size, mesh, stage):
    """Params and Adam moments of every variant: what stays whole on each device is only norms and
    biases (the largest: 72B's stacked norm scales, 2.5 MiB), so a device holds 1 / (fsdp x tensor)
    of the state (small leaves add 2% at 0.5B on 64); frozen parts (stage 1: tower and LLM) have no optimizer state."""
    from manager_jax.sharding import replicated_leaves

    for variant in ("baseline", "manager", "grid", "grid_manager"):
        setup = _recipe_setup(f"stage{stage}_{variant}_{size}", *mesh)
        largest = replicated_leaves(setup.abstract_state)[:3]
        assert largest[0][0] <= 4 << 20, (variant, largest)
        whole, per_device = _state_bytes(setup.abstract_state)
        assert per_device <= 1.05 * whole / (mesh[1] * mesh[2]), (variant, largest)
        trainable = sum(int(np.prod(p.shape)) * p.dtype.itemsize
                        for m, p in zip(jax.tree.leaves(setup.mask), jax.tree.leaves(setup.abstract_params)) if m)
        moments, _ = _state_bytes(setup.abstract_state["opt_state"])
        assert 2 * trainable <= moments <= 2 * trainable + 1024, variant  # mu and nu, plus step counters
        if stage == "1":
            assert trainable < whole / 100  # projector (+ Manager) only


def test_an_fsdp_axis_that_splits_no_large_parameter_is_refused_with_a_mesh_that_does():
    """0.5B at fsdp=256: 896 and 1152 are not multiples of 256, so the embedding, the tower and most
    of the LLM would be whole on every device (10 GiB of state per device instead of 40 MiB)."""
    from manager_jax.sharding import replicated_leaves

    with pytest.raises(ShardingError, match=r"fsdp=256 divides no dimension of text\.embed\.embedding.*"
                                            r"with its gradient and optimizer state; "
                                            r"use --set mesh\.fsdp=128 --set mesh\.data=2"):
        _recipe_setup("stage2_grid_manager_0.5b", 1, 256, 1)
    setup = _recipe_setup("stage2_grid_manager_0.5b", 2, 128, 1)
    assert replicated_leaves(setup.abstract_state)[0][0] < 1 << 20


def test_a_tensor_axis_that_splits_heads_mid_head_is_warned_about_with_sizes_that_do_not(caplog):
    """0.5B has 14 query, 2 key/value and 16 vision heads: tensor=4 splits the text heads mid-head
    (their widths 896 and 128 divide by 4, the counts do not), tensor=2 does not; 7B (28, 4, 16) on
    tensor=8 splits both text counts; 72B (64, 8, 16) on 8 keeps whole heads. The train setup logs it."""
    from jax.sharding import AbstractMesh

    from manager_jax.sharding import heads_split_mid_head

    mesh = lambda tensor: AbstractMesh((1, 1, tensor), ("data", "fsdp", "tensor"))
    warning = heads_split_mid_head(preset("0.5b"), mesh(4))
    assert "tensor=4 splits attention heads mid-head: 14 text query heads (3.5 per device), " \
           "2 text key/value heads (0.5 per device);" in warning and "vision" not in warning
    assert warning.endswith("tensor=1 or 2 keeps whole heads on each device")
    assert heads_split_mid_head(preset("0.5b"), mesh(2)) is None
    assert heads_split_mid_head(preset("0.5b"), mesh(1)) is None
    warning = heads_split_mid_head(preset("7b"), mesh(8))
    assert "28 text query heads (3.5 per device), 4 text key/value heads (0.5 per device)" in warning
    assert warning.endswith("tensor=1 or 2 or 4 keeps whole heads on each device")
    assert heads_split_mid_head(preset("72b"), mesh(8)) is None

    with caplog.at_level("WARNING", logger="manager_jax.train.state"):
        _recipe_setup("stage2_grid_manager_0.5b", 1, 2, 4)
    assert any("splits attention heads mid-head" in r.getMessage() and "--set mesh.tensor" in r.getMessage()
               for r in caplog.records)
