"""Several optimizer steps of our train step against the PyTorch reference trained the way the
original was (SPEC §2.8): HF Trainer's loss (mean CE per micro-batch, divided by the accumulation
steps, gradients averaged over the data-parallel ranks: our shard batches, with different numbers
of supervised tokens, so that this differs from one mean over all tokens),
torch.nn.utils.clip_grad_norm_, torch.optim.AdamW with the original's param groups (per LR
group, decayed or not; weight decay 0.1 here, 0 in the recipes), and
transformers' cosine schedule with its warmup-steps rounding (TrainingArguments.get_warmup_steps).

Same initial weights (random, non-zero Manager), same batches (an anyres_max_9 chat sample and a
text-only row per micro-batch), jitter off on both sides (jitter_eps=0: it is random by design).
Compares every step's loss, gradient norm and per-group LR, and every parameter after the last step.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import TrainingArguments, get_cosine_schedule_with_warmup

from manager_jax.data.conversation import IMAGE_TOKEN_INDEX as IMG
from manager_jax.reference.hf_tiny import tiny_hf_config, tiny_hf_model
from manager_jax.reference.parity import SampleSpec, build_case, jax_model_from_torch, tree_from_torch_state
from manager_jax.reference.torch_manager import init_manager_params, reference_from_hf_and_manager
from manager_jax.reference.torch_optim import layer_norm_param_names, original_param_groups
from manager_jax.sharding import MeshConfig, batch_sharding, make_mesh, path_str
from manager_jax.train.optimizer import OptimConfig
from manager_jax.train.state import init_state, jit_train_step, make_setup, place_batch
from manager_jax.train.step import MODEL_FIELDS, LossConfig
from tests.train_batches import torch_parity_configs

IMS, IME, NL = 450, 451, 198
STEPS, ACCUM, WARMUP_RATIO = 4, 2, 0.3  # ceil(0.3 * 4) = 2 warmup steps: lr 0 at step 0, peak at step 2
SHARDS = 2  # data-parallel ranks of the original, each with its own micro-batch
LRS = {"language_model": 2e-3, "projector": 3e-3, "manager": 5e-3, "vision_tower": 1e-3}
MAX_GRAD_NORM = 1.0
WEIGHT_DECAY = 0.1  # 0 in the recipes; here it checks which parameters decay, as the original
# The reference's param groups (named by their LR keyword) -> ours.
OUR_GROUP = {"base": "language_model", "multi_modal_projector": "projector", "manager": "manager",
             "vision_tower": "vision_tower"}
# Softmax over keys is invariant to a key bias (it adds q.b to a whole row of scores): the exact
# gradient is 0 and both sides' Adam steps on it are rounding noise divided by its own scale.
KEY_BIASES = ("vision.layers.attn.k.bias", "manager.blocks.1.fusion_k.bias")


def _micro_batch(rng, text_labelled):
    """A chat sample with one image (3 crops) and a text-only row of fixed lengths (one compiled
    step); the text row's last `text_labelled` tokens are supervised."""
    t = lambda n: [int(v) for v in rng.integers(1, 400, n)]
    chat = [IMS] + t(4) + [IME, NL, IMS, 7, NL] + t(3) + [IMG] + t(5) + [IME, NL, IMS, 8, NL] + t(6) + [IME, NL]
    text = [IMS] + t(20) + [IME, NL]
    last = lambda ids, n: np.where(np.arange(len(ids)) < len(ids) - n, -100, ids).tolist()
    return [SampleSpec(chat, [(500, 300)], labels=last(chat, 9)), SampleSpec(text, labels=last(text, text_labelled))]


@pytest.mark.slow
def test_steps_with_accumulation_clipping_and_schedule_match_torch():
    torch.manual_seed(0)
    hf = tiny_hf_model(tiny_hf_config(vision_layers=2, text_layers=2), seed=3, attn_implementation="eager")
    hf.train()  # no dropout in the tiny config; train() only so autograd sees the usual mode
    cfg, settings = torch_parity_configs(hf, im_start_id=IMS)
    mparams = init_manager_params(settings, cfg.text.hidden_size, seed=5, nonzero=True)
    manager = {k: v.clone().requires_grad_(True) for k, v in mparams.items()}

    rng = np.random.default_rng(0)
    # cases[step][accum][shard]; shard 0's text row is fully supervised, shard 1's in its last 3 tokens.
    cases = [[[build_case(cfg, _micro_batch(rng, (22, 3)[k]), seed=100 * s + 10 * a + k, im_start_id=IMS)
               for k in range(SHARDS)] for a in range(ACCUM)] for s in range(STEPS)]
    micro = [c for step in cases for acc in step for c in acc]
    shapes = {k: v.shape for k, v in micro[0].batch.to_model_inputs().items()}
    assert all(c.batch.to_model_inputs()[k].shape == shapes[k] for c in micro for k in shapes)

    # ---- ours -------------------------------------------------------------------------------
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    optim = OptimConfig(lr=LRS["language_model"], projector_lr=LRS["projector"], manager_lr=LRS["manager"],
                        vision_tower_lr=LRS["vision_tower"], warmup_ratio=WARMUP_RATIO, max_grad_norm=MAX_GRAD_NORM,
                        weight_decay=WEIGHT_DECAY)
    setup = make_setup(cfg, mesh, tunable_parts="mm_mlp_adapter,mm_manager,mm_language_model,mm_vision_tower",
                       optim=optim, total_steps=STEPS, loss=LossConfig("shard_mean"))
    start = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.split(jax_model_from_torch(cfg, hf, mparams))[1]))  # host copy: the step donates its state
    shardings = jax.tree.map(lambda s: s.sharding, setup.abstract_params)
    state = init_state(setup, jax.device_put(start, shardings), seed=0)
    abstract = {k: jax.ShapeDtypeStruct((ACCUM, SHARDS) + shapes[k], micro[0].batch.to_model_inputs()[k].dtype,
                                        sharding=batch_sharding(mesh, len(shapes[k]) + 2)) for k in MODEL_FIELDS}
    step_fn = jit_train_step(setup, abstract)
    ours = []
    for step_cases in cases:
        local = {k: np.stack([np.stack([c.batch.to_model_inputs()[k] for c in acc]) for acc in step_cases])
                 for k in MODEL_FIELDS}
        state, metrics = step_fn(state, place_batch(setup, local, shards=SHARDS))
        ours.append(jax.device_get(metrics))

    # ---- torch, as HF Trainer + AdamW + clip_grad_norm_ + get_cosine_schedule_with_warmup --------
    ref = reference_from_hf_and_manager(hf, manager, settings)
    groups = original_param_groups(
        [*hf.named_parameters(), *manager.items()], layer_norm_param_names(hf),
        {"multi_modal_projector": LRS["projector"], "manager": LRS["manager"], "vision_tower": LRS["vision_tower"]},
        WEIGHT_DECAY)
    opt = torch.optim.AdamW(groups, lr=LRS["language_model"], betas=(0.9, 0.999), eps=1e-8)
    warmup = TrainingArguments.get_warmup_steps(types.SimpleNamespace(warmup_steps=WARMUP_RATIO), STEPS)
    sched = get_cosine_schedule_with_warmup(opt, warmup, STEPS)
    params = [p for g in opt.param_groups for p in g["params"]]
    theirs = []
    for step_cases in cases:
        lrs = {OUR_GROUP[g["name"]]: g["lr"] for g in opt.param_groups}
        total = 0.0
        for case in (c for acc in step_cases for c in acc):
            inputs = {k: torch.from_numpy(v) for k, v in case.hf_inputs.items()}
            inputs["labels"] = inputs["labels"].long()
            _, loss = ref(**inputs, batch_num_images=case.batch_num_images)
            # HF Trainer divides by the accumulation steps; DDP averages the ranks' gradients.
            (loss / (ACCUM * SHARDS)).backward()
            total += float(loss) / (ACCUM * SHARDS)
        norm = float(torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM))
        opt.step()
        sched.step()
        opt.zero_grad()
        theirs.append({"loss": total, "grad_norm": norm, "lrs": lrs})

    # ---- compare -------------------------------------------------------------------------------
    assert sum(t["grad_norm"] > MAX_GRAD_NORM for t in theirs) >= 2, "clipping must be active in some steps"
    for s, (o, t) in enumerate(zip(ours, theirs)):
        assert float(o["loss"]) == pytest.approx(t["loss"], rel=2e-5), s
        assert float(o["grad_norm"]) == pytest.approx(t["grad_norm"], rel=1e-4), s
        for g, lr in t["lrs"].items():
            assert float(o[f"lr/{g}"]) == pytest.approx(lr, rel=1e-5, abs=1e-12), (s, g)
    assert theirs[0]["lrs"]["manager"] == 0.0 and theirs[warmup]["lrs"]["manager"] == LRS["manager"]

    torch_state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    torch_state.update({k: v.detach().numpy() for k, v in manager.items()})
    expected = tree_from_torch_state(cfg, torch_state, "hf_memory")
    flat_start = {path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(start)[0]}
    flat_ours = {path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(state["params"])[0]}
    flat_expected = {path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
    assert set(flat_expected) == set(flat_ours)
    worst = {}
    for name, want in flat_expected.items():
        moved_ref = want - flat_start[name]
        moved_ours = flat_ours[name] - flat_start[name]
        if name in KEY_BIASES:
            continue
        if not np.abs(moved_ref).max():  # no gradient in torch (the unused vision.post_ln): none here either
            assert not np.abs(moved_ours).max(), name
            continue
        # Relative to the size of the update: Adam's g/sqrt(v) amplifies fp32 rounding where g ~ 0.
        worst[name] = float(np.abs(moved_ours - moved_ref).max() / np.abs(moved_ref).max())
    print("worst relative parameter differences:", sorted(worst.items(), key=lambda kv: -kv[1])[:5])
    bad = {k: v for k, v in worst.items() if v > 1e-3}  # seen: <= 1.3e-4
    assert not bad, bad
