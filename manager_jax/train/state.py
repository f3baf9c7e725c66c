"""Train-state construction without allocation: abstract params, shardings, optimizer, jitted step.

`TrainSetup` is everything derived from the run config and a mesh. It is shared by the training
loop (real devices), the ahead-of-time compiler (a TPU topology on a CPU host) and the tests.
Nothing here allocates parameters: shapes come from `nnx.eval_shape`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from manager_jax.config import ModelConfig, check_attention_impl
from manager_jax.models.llava_ov import LlavaOV
from manager_jax.platform import target_platform
from manager_jax.sharding import (batch_sharding, check_fsdp_divides, compute_shardings, heads_split_mid_head, replicated,
                                  tree_shardings)
from manager_jax.train.optimizer import make_optimizer, parse_tunable_parts, split_trainable, trainable_mask
from manager_jax.train.step import MODEL_FIELDS, LossConfig, make_eval_step, make_train_step

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainSetup:
    """Static description of a training run on a mesh."""

    model_config: ModelConfig
    mesh: Mesh
    graphdef: Any
    abstract_params: dict  # ShapeDtypeStructs with shardings
    mask: dict  # trainable mask (bools) shaped like params
    tunable_groups: frozenset[str]
    tx: optax.GradientTransformation
    schedules: dict[str, Callable]
    abstract_state: dict  # {"params", "opt_state", "step", "rng"} ShapeDtypeStructs with shardings
    loss: LossConfig
    plain_causal: bool = False  # rows hold one right-padded sample each (no packing)

    @property
    def state_shardings(self) -> dict:
        return jax.tree.map(lambda s: s.sharding, self.abstract_state)

    def num_params(self, trainable_only: bool = False) -> int:
        leaves = jax.tree.leaves(jax.tree.map(lambda m, p: (m, p), self.mask, self.abstract_params), is_leaf=lambda x: isinstance(x, tuple))
        return int(sum(np.prod(p.shape) for m, p in leaves if m or not trainable_only))


def _with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def model_abstract(cfg: ModelConfig, seed: int = 0) -> tuple[Any, dict]:
    """(graphdef, pure dict of ShapeDtypeStructs) of the model, nothing allocated."""
    model = nnx.eval_shape(lambda: LlavaOV(cfg, rngs=nnx.Rngs(seed)))
    graphdef, state = nnx.split(model)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(state))
    return graphdef, params


def make_setup(
    model_config: ModelConfig,
    mesh: Mesh,
    *,
    tunable_parts: str,
    optim: Any,
    total_steps: int,
    loss: LossConfig,
    plain_causal: bool = False,
) -> TrainSetup:
    """Shapes and shardings of params, optimizer state and the whole train state."""
    check_attention_impl(model_config.attention_impl, target_platform())  # else a traceback from tracing the step
    graphdef, params = model_abstract(model_config)
    check_fsdp_divides(params, mesh, remedy="use --set mesh.fsdp={fsdp} --set mesh.data={data}")
    if warning := heads_split_mid_head(model_config, mesh):
        logger.warning("%s (--set mesh.tensor=...)", warning)
    param_shardings = tree_shardings(params, mesh)
    abstract_params = _with_shardings(params, param_shardings)
    mask = trainable_mask(params, tunable_parts)
    trainable, _ = split_trainable(params, mask)
    tx, schedules = make_optimizer(optim, trainable, total_steps)
    opt_shapes = jax.eval_shape(tx.init, trainable)
    abstract_opt = _with_shardings(opt_shapes, tree_shardings(opt_shapes, mesh))
    rep = replicated(mesh)
    abstract_state = {
        "params": abstract_params,
        "opt_state": abstract_opt,
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
        "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep),
    }
    return TrainSetup(
        model_config=model_config, mesh=mesh, graphdef=graphdef, abstract_params=abstract_params, mask=mask,
        tunable_groups=parse_tunable_parts(tunable_parts), tx=tx, schedules=schedules,
        abstract_state=abstract_state, loss=loss, plain_causal=plain_causal,
    )


def init_params(setup: TrainSetup, seed: int) -> dict:
    """Randomly initialised params, created directly on their shardings (no host copy)."""
    cfg = setup.model_config
    shardings = jax.tree.map(lambda s: s.sharding, setup.abstract_params)

    def create():
        return nnx.to_pure_dict(nnx.split(LlavaOV(cfg, rngs=nnx.Rngs(seed)))[1])

    create = jax.jit(create, out_shardings=shardings)
    return create()


def init_state(setup: TrainSetup, params: dict, seed: int) -> dict:
    """Fresh train state around `params` (optimizer state on its shardings, step 0)."""
    opt_shardings = jax.tree.map(lambda s: s.sharding, setup.abstract_state["opt_state"])
    trainable, _ = split_trainable(params, setup.mask)
    opt_state = jax.jit(setup.tx.init, out_shardings=opt_shardings)(trainable)
    rep = replicated(setup.mesh)
    return {
        "params": params,
        "opt_state": opt_state,
        "step": jax.device_put(jnp.zeros((), jnp.int32), rep),
        "rng": jax.device_put(jax.random.key_data(jax.random.PRNGKey(seed)), rep),
    }


def batch_field_shapes(
    cfg: ModelConfig, *, rows: int, seq_len: int, max_crops: int, max_image_tokens: int, pixel_dtype: Any = None
) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of one shard batch (docs/CONTRACTS.md §2)."""
    b, s, c, t = rows, seq_len, max_crops, max_image_tokens
    size = cfg.vision.image_size
    i32, f32 = jnp.int32, jnp.float32
    shapes = {
        "input_ids": ((b, s), i32), "positions": ((b, s), i32), "segment_ids": ((b, s), i32),
        "labels": ((b, s), i32), "pixel_values": ((c, size, size, 3), pixel_dtype or f32),
        "crop_mask": ((c,), jnp.bool_), "plan_src": ((t, 4), i32), "plan_weight": ((t, 4), f32),
        "plan_newline": ((t,), jnp.bool_), "plan_dst": ((t,), i32), "plan_manager": ((t,), jnp.bool_),
        "plan_image": ((t,), i32), "query_mask": ((b, s), jnp.bool_),
    }
    assert set(shapes) == set(MODEL_FIELDS)
    return {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in shapes.items()}


def abstract_step_batch(setup: TrainSetup, field_shapes: dict, *, accum: int, shards: int) -> dict:
    """[accum, shards, ...] ShapeDtypeStructs with the batch sharding, for jit / AOT lowering."""
    out = {}
    for k, s in field_shapes.items():
        shape = (accum, shards) + tuple(s.shape)
        out[k] = jax.ShapeDtypeStruct(shape, s.dtype, sharding=batch_sharding(setup.mesh, len(shape)))
    return out


def _compute_dtype(setup: TrainSetup) -> Any:
    """The dtype a step casts the params to (None: they are computed with as stored)."""
    cfg = setup.model_config
    return None if cfg.dtype == cfg.param_dtype else cfg.dtype


def jit_train_step(setup: TrainSetup, batch_abstract: dict, loss: LossConfig | None = None) -> Callable:
    """The train step jitted with explicit in/out shardings; the state buffers are donated.

    `loss` overrides `setup.loss` (the loop's fallback without a token budget).
    """
    param_sh = jax.tree.map(lambda s: s.sharding, setup.abstract_params)
    step = make_train_step(
        setup.graphdef, setup.mask, setup.tx, setup.schedules, loss or setup.loss, plain_causal=setup.plain_causal,
        param_shardings=param_sh, compute_shardings=compute_shardings(setup.abstract_params, setup.mesh),
        compute_dtype=_compute_dtype(setup),
    )
    state_sh = setup.state_shardings
    batch_sh = {k: v.sharding for k, v in batch_abstract.items()}
    return jax.jit(
        step,
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, replicated(setup.mesh)),
        donate_argnums=(0,),
    )


def jit_eval_step(setup: TrainSetup, batch_abstract: dict, loss: LossConfig) -> Callable:
    """`step.make_eval_step` jitted: (params on their shardings, a step batch) -> replicated sums.
    Nothing is donated: the params are the train state's."""
    step = make_eval_step(
        setup.graphdef, loss, plain_causal=setup.plain_causal,
        compute_shardings=compute_shardings(setup.abstract_params, setup.mesh), compute_dtype=_compute_dtype(setup),
    )
    param_sh = jax.tree.map(lambda s: s.sharding, setup.abstract_params)
    batch_sh = {k: v.sharding for k, v in batch_abstract.items()}
    return jax.jit(step, in_shardings=(param_sh, batch_sh), out_shardings=replicated(setup.mesh))


def place_batch(setup: TrainSetup, local: dict[str, np.ndarray], *, shards: int) -> dict[str, jax.Array]:
    """Global arrays from this process's [accum, local_shards, ...] numpy arrays."""
    out = {}
    for k, arr in local.items():
        global_shape = (arr.shape[0], shards) + arr.shape[2:]
        sharding: NamedSharding = batch_sharding(setup.mesh, arr.ndim)
        out[k] = jax.make_array_from_process_local_data(sharding, arr, global_shape)
    return out
