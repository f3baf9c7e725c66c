"""Trainable parts, learning-rate groups and the AdamW optimizer (SPEC §2.8).

``mm_tunable_parts`` of the original maps onto our parameter paths (docs/CONTRACTS.md §3):

| original name       | original params (substring)        | our params               |
|---------------------|------------------------------------|--------------------------|
| ``mm_vision_tower``   | "vision_tower" (incl. post_layernorm) | ``vision.*``             |
| ``mm_mlp_adapter``    | "mm_projector"                     | ``projector.*``          |
| ``mm_manager``        | "manager" (blocks + layer embedding)  | ``manager.*``            |
| ``mm_language_model`` | everything else, incl. image_newline  | ``text.*``, ``lm_head``, ``image_newline`` |

The optimizer works on the *trainable* subtree only (frozen leaves are ``None``): frozen parameters
get neither gradients nor optimizer state. Inside it, ``optax.multi_transform`` gives every group its
own AdamW with its own cosine schedule; global-norm clipping runs first over all trainable grads,
as HF Trainer clips before the optimizer step, with torch's ``clip_grad_norm_`` formula. Weight
decay (0 in every recipe) skips what the original's ``LLaVATrainer.create_optimizer`` skips:
biases and the LayerNorms (the vision tower's); Qwen2's RMSNorm scales, embeddings and
``image_newline`` decay, as there.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from manager_jax.sharding import path_str

SCHEDULES = ("cosine", "constant")
# Our group names, in the order the original lists the LR arguments.
GROUPS = ("projector", "manager", "vision_tower", "language_model")
TUNABLE_PARTS = {
    "mm_mlp_adapter": "projector",
    "mm_manager": "manager",
    "mm_vision_tower": "vision_tower",
    "mm_language_model": "language_model",
}


@dataclasses.dataclass
class OptimConfig:
    """AdamW with a cosine schedule and per-group peak learning rates.

    ``lr`` is the original ``learning_rate`` (the language model and anything without its own LR);
    ``projector_lr`` / ``manager_lr`` / ``vision_tower_lr`` mirror ``mm_projector_lr`` /
    ``mm_manager_lr`` / ``mm_vision_tower_lr`` (None = use ``lr``). ``per_group_lr=False``
    trains every group at ``lr``: what DeepSpeed's own optimizer section did to the original stage
    1.5 / 2 runs (SPEC §2.8 "Per-group LR caveat"), which their recipes reproduce. A ``weight_decay`` above 0
    (0 in every recipe) always follows create_optimizer's exclusions (biases, LayerNorms); that
    same DeepSpeed optimizer would have decayed every parameter.
    """

    lr: float = 1e-5
    projector_lr: float | None = None
    manager_lr: float | None = None
    vision_tower_lr: float | None = None
    per_group_lr: bool = True
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: str = "cosine"  # cosine | constant (after the warmup: HF's constant_with_warmup)
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0  # <= 0 disables clipping

    def problems(self) -> list[str]:
        """What is wrong with these settings (the run config's checks report them before a run)."""
        out = []
        if self.schedule not in SCHEDULES:
            out.append(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("lr", "projector_lr", "manager_lr", "vision_tower_lr", "weight_decay"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < math.inf:  # an infinite rate makes every weight NaN at once
                out.append(f"optim.{name} must be a finite number >= 0, got {value}")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                out.append(f"optim.{name} must lie in [0, 1), got {getattr(self, name)}")
        if not self.eps > 0:
            out.append(f"optim.eps must be > 0, got {self.eps}")
        if not 0 <= self.warmup_ratio <= 1:
            out.append("optim.warmup_ratio must lie in [0, 1]")
        if math.isnan(self.max_grad_norm) or self.max_grad_norm == math.inf:
            out.append(f"optim.max_grad_norm must be a finite number (<= 0 turns clipping off), got {self.max_grad_norm}")
        return out

    def group_lrs(self) -> dict[str, float]:
        """Peak learning rate of every group."""
        own = {"projector": self.projector_lr, "manager": self.manager_lr, "vision_tower": self.vision_tower_lr}
        out = {g: float(self.lr if (v is None or not self.per_group_lr) else v) for g, v in own.items()}
        out["language_model"] = float(self.lr)
        return out


def param_group(path: str) -> str:
    """Group of a parameter from its dotted path (see the module table)."""
    top = path.split(".", 1)[0]
    return {"vision": "vision_tower", "projector": "projector", "manager": "manager"}.get(top, "language_model")


def parse_tunable_parts(parts: str | Iterable[str]) -> frozenset[str]:
    """``"mm_mlp_adapter,mm_manager"`` (or a list) -> {"projector", "manager"}."""
    names = [p.strip() for p in (parts.split(",") if isinstance(parts, str) else parts) if p and p.strip()]
    if not names:
        raise ValueError("tunable_parts is empty: nothing would train")
    unknown = [n for n in names if n not in TUNABLE_PARTS]
    if unknown:
        raise ValueError(f"unknown mm_tunable_parts {unknown}; choose from {sorted(TUNABLE_PARTS)}")
    return frozenset(TUNABLE_PARTS[n] for n in names)


def group_labels(params: Any) -> Any:
    """Tree of group names with the structure of `params`."""
    return jax.tree_util.tree_map_with_path(lambda p, _: param_group(path_str(p)), params)


def trainable_mask(params: Any, tunable_parts: str | Iterable[str]) -> Any:
    """Tree of bools: the leaf belongs to a tunable part."""
    groups = parse_tunable_parts(tunable_parts)
    return jax.tree_util.tree_map_with_path(lambda p, _: param_group(path_str(p)) in groups, params)


def split_trainable(params: Any, mask: Any) -> tuple[Any, Any]:
    """(trainable, frozen): two trees shaped like `params`, each with None where the other has a leaf."""
    trainable = jax.tree.map(lambda m, p: p if m else None, mask, params)
    frozen = jax.tree.map(lambda m, p: None if m else p, mask, params)
    return trainable, frozen


def merge_trainable(trainable: Any, frozen: Any) -> Any:
    """Inverse of split_trainable."""
    return jax.tree.map(lambda f, t: f if t is None else t, frozen, trainable, is_leaf=lambda x: x is None)


# The original's `get_parameter_names(model, ALL_LAYERNORM_LAYERS)` minus names with "bias":
# nn.LayerNorm exists only in the vision tower (Qwen2RMSNorm is not one).
_LAYER_NORMS = ("ln1", "ln2", "post_ln")


def decays(path: str) -> bool:
    """Whether weight decay applies to the parameter at this dotted path (as the original)."""
    parts = path.split(".")
    return parts[-1] != "bias" and not any(p in _LAYER_NORMS for p in parts)


def _decay_mask(params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(lambda p, _: decays(path_str(p)), params)


def clip_by_global_norm_as_torch(max_norm: float) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when that is below 1
    (optax's clip_by_global_norm divides by the norm itself and clips only above max_norm)."""

    def update(updates, state, params=None):
        del params
        coef = max_norm / (optax.tree.norm(updates) + 1e-6)
        scale = jnp.minimum(coef, 1.0)
        return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_schedule(peak: float, total_steps: int, cfg: OptimConfig) -> optax.Schedule:
    """HF `get_cosine_schedule_with_warmup`: linear 0 -> peak over ceil(ratio * total), cosine to 0."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup = int(-(-cfg.warmup_ratio * total_steps // 1))  # ceil, as HF's get_warmup_steps
    if cfg.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak)], [warmup]
        ) if warmup else optax.constant_schedule(peak)
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1), 0.0)


def make_optimizer(
    cfg: OptimConfig, trainable_params: Any, total_steps: int
) -> tuple[optax.GradientTransformation, dict[str, Callable]]:
    """(optimizer over the trainable subtree, {group: schedule}) for the groups that have params."""
    labels = group_labels(trainable_params)
    present = sorted(set(jax.tree.leaves(labels)))
    lrs = cfg.group_lrs()
    schedules = {g: make_schedule(lrs[g], total_steps, cfg) for g in present}
    per_group = {
        g: optax.adamw(schedules[g], b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                       mask=_decay_mask if cfg.weight_decay else None)  # no mask state when there is no decay
        for g in present
    }
    chain = [clip_by_global_norm_as_torch(cfg.max_grad_norm)] if cfg.max_grad_norm > 0 else []
    chain.append(optax.multi_transform(per_group, labels))
    return optax.chain(*chain), schedules
