"""The jitted train step on one device: loss, stage semantics (what trains, at which LR), NaN skips."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from manager_jax.config import ImageConfig
from manager_jax.models.llava_ov import IGNORE_INDEX, LlavaOV, lm_loss, shifted_targets
from manager_jax.sharding import MeshConfig, batch_sharding, make_mesh, path_str
from manager_jax.train.optimizer import OptimConfig, param_group
from manager_jax.train.state import init_params, init_state, jit_train_step, make_setup, place_batch
from manager_jax.train.step import LossConfig, _even_chunk, supervised_nll
from tests.train_batches import compile_cache_fixture, random_step_batch, shard_batch, small_model

ALL_PARTS = "mm_mlp_adapter,mm_manager,mm_language_model,mm_vision_tower"
GROUP_LRS = OptimConfig(lr=1e-3, projector_lr=2e-3, manager_lr=5e-3, vision_tower_lr=3e-4, warmup_ratio=0.0,
                        schedule="constant")


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    yield from compile_cache_fixture(tmp_path_factory)


def newline_model():
    """Square images with the HF single-crop newline: image_newline exists and gets gradients."""
    image = ImageConfig(aspect_ratio="square", grid_pinpoints=None, patch_merge_type="spatial_unpad", convention="hf")
    return small_model("manager", image=image)


def one_device_step(cfg, batch, *, tunable, optim, loss=LossConfig()):
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    setup = make_setup(cfg, mesh, tunable_parts=tunable, optim=optim, total_steps=10, loss=loss)
    state = init_state(setup, init_params(setup, 0), 0)
    before = jax.tree.map(np.asarray, state["params"])
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
    step = jit_train_step(setup, abstract)
    state, metrics = step(state, place_batch(setup, batch, shards=batch["input_ids"].shape[1]))
    return setup, before, jax.tree.map(np.asarray, state["params"]), jax.device_get(metrics), state


def max_change_per_group(before, after):
    """{group: max |delta|} over the params of each optimizer group, plus image_newline on its own."""
    out: dict[str, float] = {}
    flat_b = jax.tree_util.tree_flatten_with_path(before)[0]
    flat_a = jax.tree.leaves(after)
    for (path, b), a in zip(flat_b, flat_a):
        name = path_str(path)
        key = "image_newline" if name == "image_newline" else param_group(name)
        out[key] = max(out.get(key, 0.0), float(np.max(np.abs(a - b))))
    return out


@pytest.mark.parametrize("tied", [True, False])
def test_supervised_nll_matches_model_lm_loss(tied):
    """Budgeted, chunked LM-head loss == the model's own lm_loss over full fp32 logits."""
    cfg = small_model("manager")
    cfg.text.tie_word_embeddings = tied
    batch = {k: jnp.asarray(v) for k, v in shard_batch(cfg, np.random.default_rng(1), rows=2, text_samples=3).items()}
    graphdef, params = nnx.split(LlavaOV(cfg, rngs=nnx.Rngs(0)))

    @jax.jit
    def losses(params, batch):
        model = nnx.merge(graphdef, params)
        hidden = model.hidden_states(batch)
        reference = lm_loss(model.logits(hidden), batch["labels"], batch["segment_ids"])
        ours = []
        for loss_cfg in (LossConfig(), LossConfig(token_budget=96, chunk_size=40), LossConfig(chunk_size=128),
                         LossConfig(chunk_size=37)):
            total, count = supervised_nll(model, hidden, batch["labels"], batch["segment_ids"], loss_cfg)
            ours.append(total / count)
        return reference, ours

    expected, ours = losses(params, batch)
    for value in ours:
        assert float(value) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("chunk_size, kept", [(0, 1), (16, 0)])
def test_one_lm_head_chunk_keeps_its_logits_for_the_backward_pass(chunk_size, kept, capsys):
    """One chunk: its [n, V] logits are saved, not computed again in the backward pass; several
    chunks: every chunk's logits are remade (saved, they would add up to all the logits)."""
    cfg = small_model("manager", dtype="bfloat16")
    model = LlavaOV(cfg, rngs=nnx.Rngs(0))
    n, v = 40, cfg.text.vocab_size
    hidden = jax.random.normal(jax.random.key(0), (1, n, cfg.text.hidden_size))
    labels = jax.random.randint(jax.random.key(1), (1, n), 0, v)
    segments = jnp.ones((1, n), jnp.int32)
    nll = lambda h: supervised_nll(model, h, labels, segments, LossConfig(chunk_size=chunk_size))[0]
    jax.ad_checkpoint.print_saved_residuals(nll, hidden)
    saved = [line for line in capsys.readouterr().out.splitlines() if f",{v}]" in line]
    assert len(saved) == kept, saved
    if kept:  # the matmul's bf16 output, not its fp32 copy
        assert saved[0].startswith(f"bf16[1,{n},{v}]") and "dot_general" in saved[0], saved


def _reductions_over(closed_jaxpr, size: int) -> int:
    """Number of max/sum reductions of arrays whose last axis is `size`, sub-jaxprs included."""
    jaxpr = getattr(closed_jaxpr, "jaxpr", closed_jaxpr)
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("reduce_max", "reduce_sum") and eqn.invars[0].aval.shape[-1:] == (size,):
            count += 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)):
                    count += _reductions_over(sub, size)
    return count


@pytest.mark.parametrize("chunk_size", [0, 16])
def test_lm_head_backward_makes_the_softmax_from_the_saved_logsumexp(chunk_size):
    """The gradient equals autodiff's through a plain log-sum-exp over all logits, and the
    backward pass adds no reduction over the vocabulary (the forward's max and sum are all)."""
    cfg = small_model("manager")
    model = LlavaOV(cfg, rngs=nnx.Rngs(0))
    n, v = 40, cfg.text.vocab_size
    hidden = jax.random.normal(jax.random.key(0), (1, n, cfg.text.hidden_size))
    labels = jax.random.randint(jax.random.key(1), (1, n), 0, v).at[0, ::3].set(IGNORE_INDEX)
    segments = jnp.ones((1, n), jnp.int32)
    nll = lambda h: supervised_nll(model, h, labels, segments, LossConfig(chunk_size=chunk_size))[0]

    def plain(h):
        targets, valid = shifted_targets(labels, segments)
        logits = model.logits(h)
        picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return jnp.where(valid, jax.nn.logsumexp(logits, axis=-1) - picked, 0.0).sum()

    got, expected = jax.grad(nll)(hidden), jax.grad(plain)(hidden)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-6)
    forward = _reductions_over(jax.make_jaxpr(nll)(hidden), v)
    assert forward >= 2  # the log-sum-exp's max and sum
    assert _reductions_over(jax.make_jaxpr(jax.grad(nll))(hidden), v) == forward


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tied", [True, False])
def test_target_logits_are_the_logits_at_the_targets(tied, dtype):
    cfg = small_model("manager", dtype=dtype)
    cfg.text.tie_word_embeddings = tied
    model = LlavaOV(cfg, rngs=nnx.Rngs(3))
    hidden = jax.random.normal(jax.random.key(0), (2, 5, cfg.text.hidden_size))
    targets = jax.random.randint(jax.random.key(1), (2, 5), 0, cfg.text.vocab_size)
    expected = jnp.take_along_axis(model.logits(hidden), targets[..., None], axis=-1)[..., 0]
    got = model.target_logits(hidden, targets)
    assert got.dtype == jnp.float32
    tol = 1e-6 if dtype == "float32" else 2 ** -7  # bf16: the two roundings may differ by one ulp
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=tol, atol=tol)


@pytest.mark.parametrize("n,max_chunk", [(3098, 1024), (8198, 1024), (100, 37), (16384, 4096), (5, 4), (1000, 7)])
def test_lm_head_chunks_are_even(n, max_chunk):
    chunk = _even_chunk(n, max_chunk)
    num_chunks = -(-n // chunk)
    assert chunk <= max_chunk
    assert num_chunks == -(-n // max_chunk)  # no more chunks than chunk_size asks for
    assert num_chunks * chunk - n < 8 * num_chunks or chunk == max_chunk  # padding: < 8 per chunk


def test_stage1_trains_only_projector_and_manager_at_their_lrs():
    cfg = newline_model()
    batch = random_step_batch(cfg, 2, accum=1, shards=1)
    optim = OptimConfig(lr=1e-3, manager_lr=4e-3, warmup_ratio=0.0, schedule="constant")
    setup, before, after, metrics, state = one_device_step(cfg, batch, tunable="mm_mlp_adapter,mm_manager", optim=optim)
    change = max_change_per_group(before, after)
    assert change["vision_tower"] == 0.0 and change["language_model"] == 0.0 and change["image_newline"] == 0.0
    # Adam's first step moves every parameter with a non-zero gradient by lr * g/|g| = lr.
    assert change["projector"] == pytest.approx(1e-3, rel=1e-3)
    assert change["manager"] == pytest.approx(4e-3, rel=1e-3)
    assert metrics["lr/projector"] == pytest.approx(1e-3) and metrics["lr/manager"] == pytest.approx(4e-3)
    # Frozen parameters have no optimizer state: only projector + manager leaves (mu and nu).
    names = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(before)[0]]
    n_trainable = sum(1 for n in names if n.startswith(("projector.", "manager.")))
    opt_arrays = [x for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) > 0]
    assert n_trainable == 4 + 1 + len(cfg.injection_layers())  # 2 linears, layer embedding, blocks
    assert len(opt_arrays) == 2 * n_trainable


def test_all_groups_train_at_their_lrs_and_image_newline_follows_the_lm():
    cfg = newline_model()
    batch = random_step_batch(cfg, 3, accum=1, shards=1)
    _, before, after, metrics, _ = one_device_step(cfg, batch, tunable=ALL_PARTS, optim=GROUP_LRS)
    change = max_change_per_group(before, after)
    expected = {"language_model": 1e-3, "image_newline": 1e-3, "projector": 2e-3, "manager": 5e-3, "vision_tower": 3e-4}
    for group, lr in expected.items():
        assert change[group] == pytest.approx(lr, rel=1e-3), group
    assert np.isfinite(metrics["loss"]) and metrics["finite"]


def test_nonfinite_loss_skips_the_update():
    cfg = newline_model()  # the program of the test above: a compilation cache hit
    batch = random_step_batch(cfg, 4, accum=1, shards=1)
    batch["pixel_values"] = np.full_like(batch["pixel_values"], np.nan)
    _, before, after, metrics, state = one_device_step(cfg, batch, tunable=ALL_PARTS, optim=GROUP_LRS)
    assert not metrics["finite"] and not np.isfinite(metrics["loss"])
    for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["opt_state"]))
    assert int(state["step"]) == 1  # the data was consumed; only the update is skipped


def test_a_skipped_step_keeps_adam_but_not_the_schedule_behind():
    """After a non-finite step, the next update is made at the LR the step logs: the schedule
    follows the step (data position), while Adam's moments and bias correction count updates only."""
    cfg = newline_model()  # the program of the tests above: a compilation cache hit
    good = random_step_batch(cfg, 5, accum=1, shards=1)
    bad = dict(good, pixel_values=np.full_like(good["pixel_values"], np.nan))
    # Warmup over 4 of 10 steps: lr(0) = 0, lr(1) = peak / 4.
    optim = OptimConfig(lr=1e-3, projector_lr=2e-3, manager_lr=5e-3, vision_tower_lr=3e-4, warmup_ratio=0.4,
                        schedule="constant")
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    setup = make_setup(cfg, mesh, tunable_parts=ALL_PARTS, optim=optim, total_steps=10, loss=LossConfig())
    state = init_state(setup, init_params(setup, 0), 0)
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding(mesh, v.ndim)) for k, v in good.items()}
    step = jit_train_step(setup, abstract)
    state, skipped = step(state, place_batch(setup, bad, shards=1))
    assert not bool(skipped["finite"])
    before = jax.tree.map(np.asarray, state["params"])
    state, metrics = step(state, place_batch(setup, good, shards=1))
    change = max_change_per_group(before, jax.tree.map(np.asarray, state["params"]))
    peaks = optim.group_lrs()
    for group in ("projector", "manager", "vision_tower", "language_model"):
        assert float(metrics[f"lr/{group}"]) == pytest.approx(peaks[group] / 4, rel=1e-5), group
        # Adam's first real update (bias-corrected, count 1) moves each param with a gradient by lr.
        assert change[group] == pytest.approx(peaks[group] / 4, rel=1e-3), group
