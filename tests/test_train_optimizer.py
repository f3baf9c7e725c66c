"""Tunable parts, LR groups, and the schedule, clipping and AdamW update against transformers and torch."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import get_cosine_schedule_with_warmup

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


def hf_lrs(peak, total, ratio):
    """The LR of every optimizer step 0..total-1 under HF Trainer: transformers'
    get_cosine_schedule_with_warmup stepped after each torch optimizer step, with
    num_warmup_steps = ceil(ratio * total) (TrainingArguments.get_warmup_steps of the original's
    transformers 4.40; 5.x reads a warmup_ratio of 1.0 as 1 step)."""
    import torch

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=peak)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(total * ratio), total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("total, ratio", [
    (1, 0.03), (1, 0.0), (7, 0.03), (10, 0.0), (34, 0.03), (100, 0.03), (1090, 0.03), (7, 0.5), (5, 1.0)])
def test_schedule_matches_hf(total, ratio):
    """Per step, step 0 (0 under warmup, the peak without) to the last (above 0)."""
    sched = make_schedule(2e-3, total, OptimConfig(warmup_ratio=ratio))
    want = hf_lrs(2e-3, total, ratio)
    ours = [float(sched(step)) for step in range(total)]
    np.testing.assert_allclose(ours, want, rtol=1e-6, atol=2e-3 * 1e-7)  # the schedule is fp32
    assert (want[0] == 0.0) == (math.ceil(total * ratio) > 0)


def test_adamw_steps_match_torch_adamw_with_the_original_param_groups():
    """Three steps of our optimizer (clipping, per-group AdamW, schedule) against torch:
    clip_grad_norm_ over the trainable parameters, then torch.optim.AdamW (HF's defaults: betas
    0.9 / 0.999, eps 1e-8) over LLaVATrainer.create_optimizer's groups, then the cosine schedule.

    On the tiny model's real parameters (an adaptive cross Manager: scores, gate, controller and
    fusion Linears with biases): the projector frozen (no state, unchanged), per-group LRs, weight
    decay 0.1 (0 in the recipes) to check which parameters decay (not biases and the tower's
    LayerNorms; Qwen2's RMSNorm and image_newline do), warmup 2 of 4 steps (step 0 runs at LR 0 but
    moves Adam's moments), clipping active, and some gradients exactly 0, as the original's
    DeepSpeed optimizer sees an unused parameter (the tower's post_layernorm): zero-filled, not None.
    """
    import torch

    from manager_jax.reference.hf_tiny import tiny_hf_config, tiny_hf_model
    from manager_jax.reference.parity import tree_from_torch_state
    from manager_jax.reference.torch_manager import init_manager_params
    from manager_jax.reference.torch_optim import layer_norm_param_names, original_param_groups
    from tests.train_batches import torch_parity_configs

    lrs = {"language_model": 2e-3, "projector": 3e-3, "manager": 5e-3, "vision_tower": 1e-3}
    hf = tiny_hf_model(tiny_hf_config(vision_layers=2, text_layers=2), seed=3)
    cfg, settings = torch_parity_configs(hf, im_start_id=450)
    manager = {k: torch.nn.Parameter(v) for k, v in init_manager_params(settings, cfg.text.hidden_size, seed=5).items()}
    for p in hf.model.multi_modal_projector.parameters():
        p.requires_grad_(False)
    named = [*hf.named_parameters(), *manager.items()]
    zero_grad = ("model.image_newline", "model.manager.1.zero_gate", "model.vision_tower.post_layernorm.weight",
                 "model.vision_tower.post_layernorm.bias")

    def torch_tree(values):  # our tree of {torch name: tensor}, copied (the torch step updates in place)
        return tree_from_torch_state(cfg, {n: v.detach().numpy().copy() for n, v in values.items()}, "hf_memory")

    start = torch_tree(dict(named))
    mask = trainable_mask(start, "mm_vision_tower,mm_manager,mm_language_model")
    optim = OptimConfig(lr=lrs["language_model"], projector_lr=lrs["projector"], manager_lr=lrs["manager"],
                        vision_tower_lr=lrs["vision_tower"], warmup_ratio=0.3, weight_decay=0.1)
    trainable, frozen = split_trainable(jax.tree.map(jnp.asarray, start), mask)
    tx, _ = make_optimizer(optim, trainable, total_steps=4)
    opt_state = tx.init(trainable)

    groups = original_param_groups(named, layer_norm_param_names(hf), {
        "multi_modal_projector": lrs["projector"], "manager": lrs["manager"], "vision_tower": lrs["vision_tower"]},
        weight_decay=0.1)
    assert {g["name"] for g in groups} == {"base", "vision_tower", "manager"}  # the projector is frozen
    assert any(g["weight_decay"] == 0.0 and g["name"] == "base" for g in groups)  # Qwen2 biases
    opt = torch.optim.AdamW(groups, lr=lrs["language_model"], betas=(0.9, 0.999), eps=1e-8)
    sched = get_cosine_schedule_with_warmup(opt, 2, 4)
    trained = [p for g in groups for p in g["params"]]

    rng = np.random.default_rng(0)
    norms = []
    for _ in range(3):
        for name, p in named:
            if p.requires_grad:
                g = rng.normal(size=p.shape).astype(np.float32) * 0.05
                p.grad = torch.zeros_like(p) if name in zero_grad else torch.from_numpy(g)
        grads = split_trainable(
            torch_tree({n: (p.grad if p.requires_grad else torch.zeros_like(p)) for n, p in named}), mask)[0]
        norms.append(float(torch.nn.utils.clip_grad_norm_(trained, 1.0)))
        opt.step()
        sched.step()
        updates, opt_state = tx.update(jax.tree.map(jnp.asarray, grads), opt_state, trainable)
        trainable = jax.tree.map(lambda p, u: p + u, trainable, updates)
    assert sum(n > 1.0 for n in norms) >= 2, norms  # clipping active

    want = torch_tree(dict(named))
    ours = merge_trainable(trainable, frozen)
    flat = lambda tree: {path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    flat_start, flat_want, flat_ours = flat(start), flat(want), flat(ours)
    assert flat_want.keys() == flat_ours.keys()
    for name, w in flat_want.items():
        moved_want, moved_ours = w - flat_start[name], flat_ours[name] - flat_start[name]
        if name.startswith("projector.") or name.startswith("vision.post_ln."):
            # Frozen, or a zero gradient and no decay (Adam's step is 0 / eps): unchanged.
            assert not np.abs(moved_want).max() and not np.abs(moved_ours).max(), name
            continue
        # Relative to the update, plus the rounding of the parameter itself (a decay-only update is ~1e-4 of it).
        tol = 2e-5 * np.abs(moved_want).max() + 2 * np.spacing(np.abs(w).max())
        np.testing.assert_allclose(moved_ours, moved_want, rtol=0, atol=tol, err_msg=name)


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
