"""Training on 8 fake CPU devices equals one device; state is really sharded; checkpoints move 8 -> 1."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from manager_jax.sharding import MeshConfig, batch_sharding, make_mesh, path_str
from manager_jax.train.checkpointing import Checkpointer
from manager_jax.train.optimizer import OptimConfig
from manager_jax.train.state import init_params, init_state, jit_train_step, make_setup, place_batch
from manager_jax.train.step import LossConfig
from tests.train_batches import compile_cache_fixture, random_step_batch, small_model

STEPS = 2
TUNABLE = "mm_mlp_adapter,mm_manager,mm_language_model"  # tower frozen: its backward is the slow part on CPU
OPTIM = OptimConfig(lr=2e-3, projector_lr=3e-3, manager_lr=5e-3, warmup_ratio=0.0, schedule="constant")

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py sets 8 fake CPU devices)")


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    yield from compile_cache_fixture(tmp_path_factory)


def run(mesh_config: MeshConfig, devices, batches: list[dict], cfg=None):
    """STEPS train steps on a mesh; returns (setup, final state, losses)."""
    cfg = cfg or small_model("manager")
    mesh = make_mesh(mesh_config, devices)
    setup = make_setup(cfg, mesh, tunable_parts=TUNABLE, optim=OPTIM, total_steps=10, loss=LossConfig())
    state = init_state(setup, init_params(setup, 0), 0)
    first = batches[0]
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding(mesh, v.ndim)) for k, v in first.items()}
    step = jit_train_step(setup, abstract)
    losses = []
    for batch in batches:
        state, metrics = step(state, place_batch(setup, batch, shards=batch["input_ids"].shape[1]))
        losses.append(float(metrics["loss"]))
    return setup, state, losses


@pytest.fixture(scope="module")
def runs():
    cfg = small_model("manager")
    # 8 shard batches per step. One device sees them as 2 accumulation steps of 4 shards, the
    # meshes as 1 x 8: with per-shard mean losses both are the same mean, so this also checks
    # gradient accumulation.
    flat = [random_step_batch(cfg, 10 + s, accum=1, shards=8) for s in range(STEPS)]
    as_accum = [{k: v.reshape((2, 4) + v.shape[2:]) for k, v in b.items()} for b in flat]
    single = run(MeshConfig(1, 1, 1), jax.devices()[:1], as_accum)
    dp_fsdp = run(MeshConfig(data=2, fsdp=4, tensor=1), None, flat)
    fsdp_tp = run(MeshConfig(data=1, fsdp=4, tensor=2), None, flat)
    return single, dp_fsdp, fsdp_tp


def test_losses_and_params_match_single_device(runs):
    (_, s_state, s_losses), (_, a_state, a_losses), (_, b_state, b_losses) = runs
    assert np.all(np.diff(s_losses) != 0)  # the steps did something
    np.testing.assert_allclose(a_losses, s_losses, rtol=2e-5)
    np.testing.assert_allclose(b_losses, s_losses, rtol=2e-5)
    # Adam divides by |g| + eps: where a gradient is ~eps (rare tokens) reduction-order noise in g
    # moves the update by a visible fraction of lr, so params get 1% of the steps' largest update.
    atol = 0.01 * max(OPTIM.lr, OPTIM.projector_lr, OPTIM.manager_lr) * STEPS
    for other in (a_state, b_state):
        for x, y in zip(jax.tree.leaves(other["params"]), jax.tree.leaves(s_state["params"])):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=atol)


@pytest.mark.slow
@pytest.mark.parametrize("manager_type", ["adaptive_average_zerouni", "adaptive_cross_zerouni"])
def test_adaptive_extra_query_on_packed_rows_matches_single_device(manager_type):
    """Two image samples and a text one packed per row: each image's query mask ([images, B*S]) spans
    the sharded rows, so its reductions cross devices."""
    cfg = small_model("manager", manager_type=manager_type)
    flat = [random_step_batch(cfg, 20 + s, accum=1, shards=8, images=2, seq_len=1600) for s in range(STEPS)]
    assert flat[0]["query_mask"].any() and flat[0]["segment_ids"].max() == 3
    as_accum = [{k: v.reshape((2, 4) + v.shape[2:]) for k, v in b.items()} for b in flat]
    single = run(MeshConfig(1, 1, 1), jax.devices()[:1], as_accum, cfg)[2]
    np.testing.assert_allclose(run(MeshConfig(data=1, fsdp=4, tensor=2), None, flat, cfg)[2], single, rtol=2e-5)


def test_params_and_optimizer_state_are_sharded(runs):
    _, (_, a_state, _), (_, b_state, _) = runs
    kernel = b_state["params"]["text"]["layers"]["mlp"]["up"]["kernel"]  # [layers, embed, mlp]
    assert tuple(kernel.sharding.spec) == (None, "fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (kernel.shape[0], kernel.shape[1] // 4, kernel.shape[2] // 2)
    embed = a_state["params"]["text"]["embed"]["embedding"]  # [vocab, embed]: FSDP over embed
    assert embed.addressable_shards[0].data.shape == (embed.shape[0], embed.shape[1] // 4)
    # Adam moments of the same kernel carry the kernel's sharding.
    moments = [
        x for path, x in jax.tree_util.tree_flatten_with_path(b_state["opt_state"])[0]
        if path_str(path).endswith("text.layers.mlp.up.kernel")
    ]
    assert len(moments) == 2 and all(m.sharding.spec == kernel.sharding.spec for m in moments)
    assert all(len(m.sharding.device_set) == 8 for m in moments)


def test_checkpoint_from_8_devices_restores_on_1(runs, tmp_path):
    (single_setup, _, _), _, (_, b_state, _) = runs
    ckpt = Checkpointer(str(tmp_path / "ckpt"), async_save=False)
    ckpt.save(STEPS, b_state, [{"shard": k} for k in range(8)], {"name": "test"})
    ckpt.close()
    restored, data_states, recipe = Checkpointer(str(tmp_path / "ckpt")).restore(STEPS, single_setup.abstract_state)
    assert recipe == {"name": "test"} and data_states[3] == {"shard": 3}
    assert int(restored["step"]) == STEPS
    one_device = jax.devices()[0]
    for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(b_state)):
        assert x.sharding.device_set == {one_device}
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_splash_attention_step_equals_xla_step_on_a_mesh(monkeypatch):
    """The TPU training attention (Splash, Pallas interpret mode on CPU) inside the real step."""
    import dataclasses

    from manager_jax.models import attention

    traced = []
    real = attention._splash_local
    monkeypatch.setattr(attention, "_splash_local", lambda *a, **k: traced.append(a[0].shape) or real(*a, **k))
    base = small_model("manager")
    batch = random_step_batch(base, 3, accum=1, shards=4, images=0, text_samples=5, seq_len=256)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    results = {}
    for impl in ("xla", "splash"):
        cfg = dataclasses.replace(base, attention_impl=impl)
        setup = make_setup(cfg, mesh, tunable_parts=TUNABLE, optim=OPTIM, total_steps=10, loss=LossConfig())
        state = init_state(setup, init_params(setup, 0), 0)
        abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
        step = jit_train_step(setup, abstract)
        state, metrics = step(state, place_batch(setup, batch, shards=4))
        results[impl] = (float(metrics["loss"]), float(metrics["grad_norm"]), state["params"])
    # Every attention ran on the kernel, per device: the text layers' (1 row, 256 slots, 2 of 4
    # heads) and the vision tower's (its crops padded to 768 tokens, half the heads).
    v = base.vision
    assert set(traced) == {(1, 256, 2, base.text.head_dim), (1, 768, v.num_heads // 2, v.hidden_size // v.num_heads)}
    (xla_loss, xla_norm, xla_params), (sp_loss, sp_norm, sp_params) = results["xla"], results["splash"]
    assert sp_loss == pytest.approx(xla_loss, rel=1e-5)
    assert sp_norm == pytest.approx(xla_norm, rel=1e-4)
    for a, b in zip(jax.tree.leaves(sp_params), jax.tree.leaves(xla_params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=0.01 * OPTIM.manager_lr)


def test_manager_features_are_split_over_the_tensor_axis():
    """The Manager's [N, T, D] features (and every injection's [T, D] update) are split over
    "tensor" on D. Whole, GSPMD leaves them replicated like the residual stream, and at 72B
    (tensor 8) their copies alone overfill a v5p chip (`run.py compile`, RESULTS.md)."""
    import re

    cfg = small_model("grid_manager")  # grid: T (plan tokens) differs from P (crop patches)
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    setup = make_setup(cfg, mesh, tunable_parts=TUNABLE, optim=OPTIM, total_steps=10, loss=LossConfig())
    state = init_state(setup, init_params(setup, 0), 0)
    batch = random_step_batch(cfg, 5, accum=1, shards=8, seq_len=1664)
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
    hlo = jit_train_step(setup, abstract).lower(state, abstract).compile().as_text()
    t, d = batch["plan_src"].shape[-2], cfg.text.hidden_size
    per_token = lambda width: set(re.findall(rf"\w+\[[0-9,]*\b{t},{width}\]", hlo))  # noqa: E731
    assert per_token(d // 2), "no per-image-token array split over tensor"
    assert not per_token(d), f"per-image-token arrays left whole: {sorted(per_token(d))}"
