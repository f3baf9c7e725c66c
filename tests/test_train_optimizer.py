"""Tunable parts, LR groups, the schedule and the AdamW update against independent formulas."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from manager_jax.sharding import path_str
from manager_jax.train.optimizer import (
    OptimConfig,
    make_optimizer,
    make_schedule,
    merge_trainable,
    param_group,
    parse_tunable_parts,
    split_trainable,
    trainable_mask,
)
from manager_jax.train.state import model_abstract
from tests.train_batches import small_model


def names_of(tree):
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


@pytest.fixture(scope="module")
def params():
    return model_abstract(small_model("grid_manager"))[1]


@pytest.mark.parametrize(
    "parts, trained_prefixes",
    [
        ("mm_mlp_adapter", ("projector.",)),
        ("mm_manager", ("manager.",)),  # blocks and the layer embedding ("manager" substring)
        ("mm_vision_tower", ("vision.",)),  # includes the unused post_ln (original: "vision_tower" substring)
        ("mm_language_model", ("text.", "image_newline")),  # everything else, image_newline included
        ("mm_mlp_adapter,mm_manager", ("projector.", "manager.")),
    ],
)
def test_tunable_parts_name_semantics(params, parts, trained_prefixes):
    mask = trainable_mask(params, parts)
    for name, trained in zip(names_of(params), jax.tree.leaves(mask)):
        assert trained == name.startswith(trained_prefixes), name
    assert "vision.post_ln.scale" in names_of(params) and "image_newline" in names_of(params)


def test_unknown_part_is_rejected():
    with pytest.raises(ValueError, match="unknown mm_tunable_parts"):
        parse_tunable_parts("mm_mlp_adapter,mm_projector")
    with pytest.raises(ValueError, match="empty"):
        parse_tunable_parts(" , ")


def test_groups_and_lrs():
    assert [param_group(n) for n in ("vision.layers.ln1.scale", "projector.linear1.bias", "manager.layer_embedding",
                                     "text.embed.embedding", "lm_head.kernel", "image_newline")] == [
        "vision_tower", "projector", "manager", "language_model", "language_model", "language_model"]
    cfg = OptimConfig(lr=1e-5, vision_tower_lr=2e-6, manager_lr=5e-5)
    assert cfg.group_lrs() == {"projector": 1e-5, "manager": 5e-5, "vision_tower": 2e-6, "language_model": 1e-5}
    cfg.per_group_lr = False  # what DeepSpeed's optimizer section did to the original (SPEC §2.8)
    assert set(cfg.group_lrs().values()) == {1e-5}


def hf_cosine_with_warmup(step, peak, total, ratio):
    """transformers.get_cosine_schedule_with_warmup with warmup = ceil(ratio * total)."""
    warmup = math.ceil(ratio * total)
    if step < warmup:
        return peak * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return peak * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


@pytest.mark.parametrize("total, ratio", [(100, 0.03), (1091, 0.03), (7, 0.5), (10, 0.0)])
def test_schedule_matches_hf(total, ratio):
    sched = make_schedule(2e-3, total, OptimConfig(warmup_ratio=ratio))
    for step in range(total + 1):
        assert float(sched(step)) == pytest.approx(hf_cosine_with_warmup(step, 2e-3, total, ratio), rel=1e-5, abs=2e-3 * 1e-6)  # fp32 schedule


def test_adamw_with_clipping_matches_a_numpy_transcription():
    rng = np.random.default_rng(0)
    params = {"projector": {"w": rng.normal(size=(3, 4)).astype(np.float32)},
              "text": {"w": rng.normal(size=(5,)).astype(np.float32)},
              "vision": {"w": rng.normal(size=(2,)).astype(np.float32)}}
    mask = {"projector": {"w": True}, "text": {"w": True}, "vision": {"w": False}}
    cfg = OptimConfig(lr=1e-2, projector_lr=3e-2, warmup_ratio=0.0, schedule="constant", max_grad_norm=1.0,
                      weight_decay=0.0)
    trainable, frozen = split_trainable(params, mask)
    assert frozen["projector"]["w"] is None and trainable["vision"]["w"] is None
    tx, _ = make_optimizer(cfg, trainable, total_steps=10)
    state = tx.init(trainable)
    current = jax.tree.map(jnp.asarray, trainable)
    ref = {k: params[k]["w"].astype(np.float64) for k in ("projector", "text")}
    m = {k: np.zeros_like(v) for k, v in ref.items()}
    v = {k: np.zeros_like(x) for k, x in ref.items()}
    lrs = {"projector": 3e-2, "text": 1e-2}
    for t in range(1, 4):
        grads = {k: rng.normal(size=ref[k].shape) * 3 for k in ref}
        norm = math.sqrt(sum((g**2).sum() for g in grads.values()))
        scale = min(1.0, 1.0 / (norm + 1e-6))  # torch's clip_grad_norm_(1.0) over all trainable grads
        for k in ref:
            g = grads[k] * scale
            m[k] = 0.9 * m[k] + 0.1 * g
            v[k] = 0.999 * v[k] + 0.001 * g * g
            mhat, vhat = m[k] / (1 - 0.9**t), v[k] / (1 - 0.999**t)
            ref[k] = ref[k] - lrs[k] * mhat / (np.sqrt(vhat) + 1e-8)
        g_tree = {"projector": {"w": jnp.asarray(grads["projector"], jnp.float32)},
                  "text": {"w": jnp.asarray(grads["text"], jnp.float32)}, "vision": {"w": None}}
        updates, state = tx.update(g_tree, state, current)
        current = jax.tree.map(lambda p, u: p + u, current, updates)
    for k in ref:
        np.testing.assert_allclose(np.asarray(current[k]["w"]), ref[k], rtol=1e-5, atol=1e-6)
    merged = merge_trainable(current, frozen)
    np.testing.assert_array_equal(merged["vision"]["w"], params["vision"]["w"])


@pytest.mark.parametrize("norm", [0.5, 1.0 - 3e-7, 1.0, 1.0 + 1e-6, 3.0])
def test_clipping_equals_torch_clip_grad_norm(norm):
    """Around max_norm the formulas differ: torch scales by max_norm / (norm + 1e-6) whenever that
    is below 1 (also just under max_norm), optax's clip_by_global_norm by max_norm / norm above it."""
    import torch

    from manager_jax.train.optimizer import clip_by_global_norm_as_torch

    rng = np.random.default_rng(1)
    grads = {"a": rng.normal(size=(7, 3)).astype(np.float32), "b": rng.normal(size=(5,)).astype(np.float32)}
    total = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values()))
    grads = {k: (g / total * norm).astype(np.float32) for k, g in grads.items()}
    tensors = [torch.nn.Parameter(torch.zeros(g.shape)) for g in grads.values()]
    for t, g in zip(tensors, grads.values()):
        t.grad = torch.from_numpy(g.copy())
    torch.nn.utils.clip_grad_norm_(tensors, 1.0)
    tx = clip_by_global_norm_as_torch(1.0)
    ours, _ = tx.update(jax.tree.map(jnp.asarray, grads), tx.init(grads))
    for t, key in zip(tensors, grads):
        np.testing.assert_allclose(np.asarray(ours[key]), t.grad.numpy(), rtol=2e-7, atol=0)
