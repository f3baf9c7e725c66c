"""The jitted train step over pure state (DESIGN.md "Sharding").

State is a plain dict ``{"params", "opt_state", "step", "rng"}``: ``params`` the full pure param
dict (docs/CONTRACTS.md §3), ``opt_state`` the optimizer state of the *trainable* subtree only.
The model is rebuilt inside the step with ``nnx.merge(graphdef, params)``.

A step's batch stacks ``accum x shards`` fixed-shape batches (docs/CONTRACTS.md §2) on two leading
axes: every array is ``[accum, shards, ...]``. Each shard is one independent batch (its crops, plan
indices and rows are local to it), so the model is ``vmap``-ed over shards and the shard axis is
sharded over the (data, fsdp) mesh axes: gathers and scatters of the token plan never cross
devices. Gradient accumulation scans over ``accum``.

Loss normalisation (``loss_normalization``):
- ``shard_mean``: mean token CE per shard batch, averaged over shards and accumulation steps, as
  the original (HF Trainer 4.40 + DDP: mean per micro-batch, gradients averaged over ranks and
  divided by the accumulation steps).
- ``token_mean``: one mean over every supervised token of the global batch.

Only the hidden states at supervised positions go through the LM head (at most
``loss_token_budget`` per shard, 0 = all positions), in chunks of ``loss_chunk_size`` with
rematerialisation: fp32 logits of [B, S, V] are never materialised.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from manager_jax.models.attention import AttentionMesh, sharded_attention
from manager_jax.models.layers import layer_params_transform
from manager_jax.models.llava_ov import shifted_targets
from manager_jax.platform import target_platform
from manager_jax.sharding import BATCH_AXES, layer_compute_sharding
from manager_jax.train.optimizer import merge_trainable, split_trainable

LOSS_NORMALIZATIONS = ("shard_mean", "token_mean")
# Fields of the batch contract that the model reads.
MODEL_FIELDS = (
    "input_ids", "positions", "segment_ids", "labels", "pixel_values", "crop_mask", "plan_src",
    "plan_weight", "plan_newline", "plan_dst", "plan_manager", "plan_image", "query_mask",
)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    normalization: str = "shard_mean"
    token_budget: int = 0  # supervised positions per shard batch sent through the LM head; 0 = all
    chunk_size: int = 0  # LM-head chunk (positions); 0 = one chunk

    def __post_init__(self) -> None:
        if self.normalization not in LOSS_NORMALIZATIONS:
            raise ValueError(f"loss_normalization must be one of {LOSS_NORMALIZATIONS}, got {self.normalization!r}")
        if self.token_budget < 0 or self.chunk_size < 0:
            raise ValueError("loss_token_budget and loss_chunk_size must be >= 0")


def _even_chunk(n: int, max_chunk: int) -> int:
    """Chunk length (<= max_chunk, a multiple of 8 where it can be) for n positions in
    ceil(n / max_chunk) nearly equal chunks."""
    num_chunks = -(-n // max_chunk)
    per_chunk = -(-n // num_chunks)
    return min(-(-per_chunk // 8) * 8, max_chunk)


LSE_NAME = "lm_head_logsumexp"


@jax.custom_vjp
def logsumexp_rows(logits: jax.Array) -> jax.Array:
    """``logsumexp(logits, axis=-1)`` whose gradient is ``exp(logits - lse)``, made from the saved
    log-sum-exp in one pass over the logits (as torch's log_softmax backward): autodiff's gradient,
    ``exp(logits - max) / sum``, would make the backward pass recompute the max and the sum (two
    more reads of the [n, V] logits)."""
    return jax.nn.logsumexp(logits, axis=-1)


def _logsumexp_rows_fwd(logits):
    # Named so that the loss's remat policies keep it (a float per row) for the backward pass.
    lse = checkpoint_name(jax.nn.logsumexp(logits, axis=-1), LSE_NAME)
    return lse, (logits, lse)


def _logsumexp_rows_bwd(residuals, grad):
    logits, lse = residuals
    return (grad[..., None] * jnp.exp(logits - lse[..., None]),)


logsumexp_rows.defvjp(_logsumexp_rows_fwd, _logsumexp_rows_bwd)


def supervised_nll(model, hidden: jax.Array, labels: jax.Array, segment_ids: jax.Array, cfg: LossConfig):
    """(sum of token CE, number of supervised tokens) of one shard batch, from hidden states [B, S, D]."""
    b, s, d = hidden.shape
    targets, valid = shifted_targets(labels, segment_ids)
    flat_h, flat_t, flat_v = hidden.reshape(b * s, d), targets.reshape(-1), valid.reshape(-1)
    if cfg.token_budget and cfg.token_budget < b * s:
        # First `token_budget` supervised positions (the loop checks that none are left out).
        (idx,) = jnp.nonzero(flat_v, size=cfg.token_budget, fill_value=0)
        keep = jnp.arange(cfg.token_budget) < flat_v.sum()
        flat_h, flat_t, flat_v = flat_h[idx], flat_t[idx], keep
    n = flat_h.shape[0]
    chunk = n
    if cfg.chunk_size and cfg.chunk_size < n:
        # As many chunks as chunk_size asks for, evened out (to a multiple of 8) so that the last
        # one is not mostly padding: 3,098 positions in chunks of <= 1024 -> 4 x 776, not 4 x 1024.
        chunk = _even_chunk(n, cfg.chunk_size)
    pad = -n % chunk
    if pad:
        flat_h = jnp.pad(flat_h, ((0, pad), (0, 0)))
        flat_t = jnp.pad(flat_t, (0, pad))
        flat_v = jnp.pad(flat_v, (0, pad))
    chunks = (flat_h.reshape(-1, chunk, d), flat_t.reshape(-1, chunk), flat_v.reshape(-1, chunk))

    def chunk_nll(h, t, v):
        # log-sum-exp minus the target's logit: the only [chunk, V] arrays are the logits and,
        # in the backward pass, their softmax.
        nll = logsumexp_rows(model.logits(h[None])[0]) - model.target_logits(h, t)
        return jnp.where(v, nll, 0.0).sum()

    keep_lse = jax.checkpoint_policies.save_only_these_names(LSE_NAME)
    if chunks[0].shape[0] == 1:
        # One chunk: its bf16 logits are kept for the backward pass rather than computed again
        # (at most chunk_size x V); their fp32 copy and softmax are still remade.
        keep_logits = jax.checkpoint(chunk_nll, policy=jax.checkpoint_policies.save_from_both_policies(
            jax.checkpoint_policies.dots_with_no_batch_dims_saveable, keep_lse))
        total = keep_logits(chunks[0][0], chunks[1][0], chunks[2][0])
    else:
        # Each chunk's logits are recomputed in the backward pass instead of stored.
        total, _ = jax.lax.scan(lambda acc, xs: (acc + jax.checkpoint(chunk_nll, policy=keep_lse)(*xs), None),
                                jnp.zeros((), jnp.float32), chunks)
    return total, valid.sum()


def gather_stacked_layers(model: nnx.Module, mesh: Any):
    """A context in which the model's layer scans all-gather each layer's weights in the layer body.

    Outside, the stacked params stay FSDP-sharded; inside the (rematerialised) body each layer's
    slice is constrained to its gathered compute sharding. Peak memory then holds one layer of
    whole weights instead of the whole model, and the backward pass reduce-scatters each layer's
    gradient as it is made.
    """
    stacks = {
        id(node): ".".join(str(p) for p in path)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, nnx.Module) and path and path[-1] == "layers"
    }

    def gather(layers: nnx.Module, layer_state: Any) -> Any:
        stack_path = stacks.get(id(layers))
        if stack_path is None:
            return layer_state

        def one(path, leaf):
            sharding = layer_compute_sharding(stack_path, path, leaf.shape, mesh)
            return jax.lax.with_sharding_constraint(leaf, sharding)

        return jax.tree_util.tree_map_with_path(one, layer_state)

    return layer_params_transform(gather)


def count_supervised(labels: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Supervised (target-bearing) positions of a batch, with the model's shift rule."""
    return shifted_targets(labels, segment_ids)[1].sum()


def batch_stats(batch: dict) -> dict[str, jax.Array]:
    """Work done by a [accum, shards, ...] batch: real tokens, sum of squared segment lengths, crops, samples.

    Computed on device so the FLOP count covers every process's shards without a host exchange.
    """
    seg = batch["segment_ids"]
    rows = seg.reshape(-1, seg.shape[-1])
    lengths = jax.vmap(lambda r: jnp.bincount(r, length=r.shape[0] + 1)[1:])(rows).astype(jnp.float32)
    return {
        "real_tokens": (seg > 0).sum(),
        "attn_sq": (lengths**2).sum(),
        "crops": batch["crop_mask"].sum(),
        "samples": rows.max(axis=-1).sum(),
    }


def use_plain_causal(requested: bool) -> bool:
    """Whether to promise the model a plain causal mask (rows of one right-padded sample each).

    Causal masking alone is then exact for every real token, and only the GPU cuDNN kernel gains
    from it: elsewhere the model's mask-free path is not taken (and the explicit mask is as fast).
    """
    return requested and target_platform() == "gpu"


def _skip_keeping_schedule(kept: Any, stepped: Any) -> Any:
    """`kept` (the optimizer state of a possibly skipped step) with the LR schedules' step counts
    of `stepped`: the schedule follows the step, so a skipped step neither delays it nor makes
    the logged `lr/*` (the schedule at the step) differ from the LR applied. Adam's moments and
    bias-correction count stay kept: they count real updates, as torch's AdamW state does."""
    is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
    return jax.tree.map(lambda k, s: s if is_schedule(k) else k, kept, stepped, is_leaf=is_schedule)


def _for_compute(compute_shardings: Any, compute_dtype: Any) -> Callable[[Any], Any]:
    """params -> the params a micro-step computes with: cast to the compute dtype and constrained
    to `compute_shardings` (whole, tensor-split weights on every device); identity without them."""
    if compute_shardings is None:
        return lambda params: params

    def one(p, sharding):
        if compute_dtype is not None and jnp.issubdtype(p.dtype, jnp.floating):
            p = p.astype(compute_dtype)  # the model casts every weight to its compute dtype anyway
        return jax.lax.with_sharding_constraint(p, sharding)

    return lambda params: jax.tree.map(one, params, compute_shardings)


def _mesh_and_shard_axes(compute_shardings: Any) -> tuple[Any, tuple[str, ...] | None]:
    """The mesh of `compute_shardings` (None without) and the mesh axes the shard axis is split over."""
    mesh = None if compute_shardings is None else jax.tree.leaves(compute_shardings)[0].mesh
    # The shard axis is split over these mesh axes; telling vmap so lets shard_maps inside the
    # model (the Splash attention) keep each shard on its own devices.
    shard_axes = None if mesh is None else tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1) or None
    return mesh, shard_axes


def _shard_nll(graphdef: Any, loss_cfg: LossConfig, plain: bool, mesh: Any) -> Callable:
    """(params, shard batch, jitter key or None) -> (sum of token CE, supervised tokens) of one shard."""

    def shard_nll(params, shard, key):
        model = nnx.merge(graphdef, params)
        with contextlib.ExitStack() as scope:
            if mesh is not None:
                scope.enter_context(gather_stacked_layers(model, mesh))
                scope.enter_context(sharded_attention(AttentionMesh(mesh)))
            hidden = model.hidden_states(shard, jitter_key=key, plain_causal=plain)
        return supervised_nll(model, hidden, shard["labels"], shard["segment_ids"], loss_cfg)

    return shard_nll


def make_train_step(
    graphdef: Any,
    trainable_mask: Any,
    tx: optax.GradientTransformation,
    schedules: dict[str, Callable],
    loss_cfg: LossConfig,
    plain_causal: bool = False,
    *,
    param_shardings: Any = None,
    compute_shardings: Any = None,
    compute_dtype: Any = None,
) -> Callable[[dict, dict], tuple[dict, dict]]:
    """train_step(state, batch) -> (new state, metrics). Pure; jit it with shardings (loop / aot).

    `plain_causal`: every row holds one sample (no packing), see `use_plain_causal`.
    `compute_shardings` (``sharding.compute_shardings``) and `compute_dtype`: each micro-step
    casts the params to the compute dtype and all-gathers them over the FSDP axis, so every device
    runs its batch shards with whole (tensor-split) weights; without this, GSPMD propagates the
    weights' FSDP split into the activations and all-reduces activations instead. Params outside
    the layer stacks are gathered once per micro-step; stacked layer params one layer at a time
    inside the layer scan (:func:`gather_stacked_layers`). Gradients are reduce-scattered back
    onto `param_shardings`.
    """
    plain = use_plain_causal(plain_causal)
    for_compute = _for_compute(compute_shardings, compute_dtype)

    def on_param_shardings(tree):
        if param_shardings is None:
            return tree
        return jax.tree.map(lambda g, s: jax.lax.with_sharding_constraint(g, s), tree, split_trainable(param_shardings, trainable_mask)[0])

    mesh, shard_axes = _mesh_and_shard_axes(compute_shardings)
    shard_nll = _shard_nll(graphdef, loss_cfg, plain, mesh)

    def train_step(state: dict, batch: dict) -> tuple[dict, dict]:
        batch = {k: v for k, v in batch.items() if k in MODEL_FIELDS}
        params, step = state["params"], state["step"]
        trainable, frozen = split_trainable(params, trainable_mask)
        accum, shards = batch["input_ids"].shape[:2]
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
        keys = jax.random.split(step_key, accum * shards).reshape(accum, shards)
        total_tokens = jnp.maximum(
            jax.vmap(jax.vmap(count_supervised))(batch["labels"], batch["segment_ids"]).sum(), 1
        )

        def micro_loss(tr, micro, micro_keys):
            full = for_compute(merge_trainable(tr, frozen))
            sums, counts = jax.vmap(lambda shard, k: shard_nll(full, shard, k), spmd_axis_name=shard_axes)(micro, micro_keys)
            if loss_cfg.normalization == "shard_mean":
                loss = jnp.mean(sums / jnp.maximum(counts, 1)) / accum
            else:
                loss = sums.sum() / total_tokens
            return loss, (sums.sum(), counts.sum())

        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

        def accumulate(carry, xs):
            grads, loss, nll, count = carry
            (l, (s, c)), g = grad_fn(trainable, *xs)
            return (on_param_shardings(jax.tree.map(jnp.add, grads, g)), loss + l, nll + s, count + c), None

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
        (grads, loss, nll, count), _ = jax.lax.scan(accumulate, init, (batch, keys))

        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, state["opt_state"], trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        # A non-finite loss or gradient skips the update (the loop aborts after K in a row).
        keep = lambda new, old: jnp.where(finite, new, old)
        new_trainable = jax.tree.map(keep, new_trainable, trainable)
        new_opt = _skip_keeping_schedule(jax.tree.map(keep, new_opt, state["opt_state"]), new_opt)
        new_state = {
            "params": merge_trainable(new_trainable, frozen),
            "opt_state": new_opt,
            "step": step + 1,
            "rng": state["rng"],
        }
        metrics = {
            "loss": loss,
            "token_mean_loss": nll / jnp.maximum(count, 1),
            "grad_norm": grad_norm,
            "finite": finite,
            "supervised_tokens": count,
            **batch_stats(batch),
            **{f"lr/{g}": sched(step) for g, sched in schedules.items()},
        }
        return new_state, metrics

    return train_step


def make_eval_step(
    graphdef: Any,
    loss_cfg: LossConfig,
    plain_causal: bool = False,
    *,
    compute_shardings: Any = None,
    compute_dtype: Any = None,
) -> Callable[[dict, dict], dict]:
    """eval_step(params, batch) -> {"nll", "tokens", "samples"}: the sums of one [accum, shards, ...]
    batch, with the model as at inference (no Manager jitter) and no gradients. Pure; jit it with
    shardings (`state.jit_eval_step`). The held-out loss is the sum of "nll" over a data set divided
    by the sum of "tokens" (one mean over its supervised tokens, whatever the batch layout)."""
    plain = use_plain_causal(plain_causal)
    for_compute = _for_compute(compute_shardings, compute_dtype)
    mesh, shard_axes = _mesh_and_shard_axes(compute_shardings)
    shard_nll = _shard_nll(graphdef, loss_cfg, plain, mesh)

    def eval_step(params: dict, batch: dict) -> dict:
        batch = {k: v for k, v in batch.items() if k in MODEL_FIELDS}
        full = for_compute(params)

        def micro(carry, shards):
            sums, counts = jax.vmap(lambda shard: shard_nll(full, shard, None), spmd_axis_name=shard_axes)(shards)
            return (carry[0] + sums.sum(), carry[1] + counts.sum()), None

        (nll, tokens), _ = jax.lax.scan(micro, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)), batch)
        return {"nll": nll, "tokens": tokens, "samples": batch_stats(batch)["samples"]}

    return eval_step
