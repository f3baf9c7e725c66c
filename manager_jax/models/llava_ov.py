"""LLaVA-OneVision + Manager assembly: crops -> tower -> projector -> token plan -> decoder -> logits.

Inputs follow the batch contract (docs/CONTRACTS.md §2). The token plan makes the dynamic multi-grid
algorithm (unpad, bilinear downsampling, newlines) a static gather + weighted sum + scatter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from manager_jax.config import ModelConfig
from manager_jax.models.attention import split_width_over_heads_axis
from manager_jax.models.layers import activation, linear
from manager_jax.models.manager import Manager, ManagerTokens
from manager_jax.models.qwen2 import Qwen2Decoder
from manager_jax.models.siglip import SiglipTower

IGNORE_INDEX = -100


class Projector(nnx.Module):
    """mlp2x_gelu: Linear -> exact (erf) GELU -> Linear. Initialised as torch's nn.Linear, biases
    too: the original builds it after loading the checkpoint (stage 1 trains it from there)."""

    def __init__(self, din: int, dout: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.linear1 = linear(din, dout, bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                              torch_bias_init=True)
        self.linear2 = linear(dout, dout, bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                              torch_bias_init=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear2(activation(jax.nn.gelu, self.linear1(x), approximate=False))  # nn.GELU(): erf


def gather_plan(features: jax.Array, src: jax.Array, weight: jax.Array) -> jax.Array:
    """features [..., P, D] (P = crops*729), src/weight [T, 4] -> [..., T, D] bilinear combination.

    One gather per tap, accumulated in fp32 and fused with the weighting: the [..., T, 4, D] taps
    are never materialised (7 GiB per chip for the 13 Manager layers of a 16k-token 7B row).
    """
    w = weight.astype(jnp.float32)
    out = None
    for k in range(src.shape[-1]):
        tap = jnp.take(features, src[:, k], axis=-2).astype(jnp.float32) * w[:, k, None]
        out = tap if out is None else out + tap
    return out.astype(features.dtype)


class LlavaOV(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        d = cfg.text.hidden_size
        self.vision = SiglipTower(cfg.vision, dtype=dtype, param_dtype=param_dtype, scan_layers=cfg.scan_layers,
                                  remat_policy=cfg.remat_policy, impl=cfg.attention_impl,
                                  token_multiple=cfg.vision_token_multiple, rngs=rngs)
        self.projector = Projector(cfg.vision.hidden_size, d, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if cfg.image.has_newline:
            self.image_newline = nnx.Param(jax.random.normal(rngs.params(), (d,), param_dtype) / jnp.sqrt(d))
        self.text = Qwen2Decoder(cfg.text, dtype=dtype, param_dtype=param_dtype, impl=cfg.attention_impl,
                                 scan_layers=cfg.scan_layers, remat_policy=cfg.remat_policy, rngs=rngs)
        if not cfg.text.tie_word_embeddings:
            self.lm_head = linear(d, cfg.text.vocab_size, bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if cfg.manager.enabled:
            self.manager = Manager(cfg, rngs=rngs)

    # ---- images ------------------------------------------------------------------------------
    def encode_images(self, pixel_values: jax.Array):
        """[C, 384, 384, 3] -> main [C*729, D], manager [N, C*729, D] (with layer embedding) or None."""
        select = self.cfg.manager.select_layers if self.cfg.manager.enabled else None
        last, selected = self.vision(pixel_values, select)
        main = self.projector(last)
        main = main.reshape(-1, main.shape[-1])
        if selected is None:
            return main, None
        mgr = self.projector(selected)  # the same projector (SPEC §2.3)
        mgr = mgr + self.manager.layer_embedding[...].astype(mgr.dtype)[:, None, None, :]
        # Split over the tensor axis from here on (the projector reduce-scatters into it): every
        # injection reads all N layers of every image token, and whole they would fill a 72B chip.
        mgr = split_width_over_heads_axis(mgr)
        return main, mgr.reshape(mgr.shape[0], -1, mgr.shape[-1])

    def _newline(self, dtype):
        if self.cfg.image.has_newline:
            return self.image_newline[...].astype(dtype)
        return None

    def image_tokens(self, features: jax.Array, batch: dict) -> jax.Array:
        """Plan -> image token features [..., T, D] (newline tokens get image_newline)."""
        out = gather_plan(features, batch["plan_src"], batch["plan_weight"])
        newline = self._newline(out.dtype)
        if newline is not None:
            out = jnp.where(batch["plan_newline"][:, None], newline, out)
        return out

    # ---- forward -----------------------------------------------------------------------------
    def embed(self, batch: dict) -> tuple[jax.Array, ManagerTokens | None]:
        ids = batch["input_ids"]
        b, s = ids.shape
        h = self.text.embed(ids)
        if "pixel_values" not in batch or batch["plan_src"].shape[0] == 0:
            return h, None
        main, mgr = self.encode_images(batch["pixel_values"])
        tokens = self.image_tokens(main, batch).astype(h.dtype)
        h = h.reshape(b * s, -1).at[batch["plan_dst"]].set(tokens, mode="drop").reshape(h.shape)
        if mgr is None:
            return h, None
        mtok = ManagerTokens(
            features=split_width_over_heads_axis(self.image_tokens(mgr, batch)),
            dst=batch["plan_dst"],
            active=batch["plan_manager"] & (batch["plan_dst"] < b * s),
            image=batch["plan_image"],
            query_mask=batch.get("query_mask"),
            segment_ids=batch["segment_ids"],
            num_images=int(batch["pixel_values"].shape[0]),
        )
        return h, mtok

    def hidden_states(self, batch: dict, *, jitter_key: jax.Array | None = None, plain_causal: bool = False) -> jax.Array:
        h, mtok = self.embed(batch)
        positions, seg = batch["positions"], batch["segment_ids"]
        ctx = self.text.context(positions, seg, plain_causal=plain_causal)
        inject = None
        layers = tuple(self.cfg.injection_layers())
        if mtok is not None and layers:
            keys = jax.random.split(jitter_key, len(layers)) if jitter_key is not None else [None] * len(layers)
            inject = lambda j, x: self.manager.inject(j, x, mtok, keys[j])
        out, _ = self.text(h, ctx, injection_layers=layers, inject=inject)
        return out

    def logits(self, hidden: jax.Array) -> jax.Array:
        if self.cfg.text.tie_word_embeddings:
            logits = self.text.embed.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        return logits.astype(jnp.float32)

    def target_logits(self, hidden: jax.Array, targets: jax.Array) -> jax.Array:
        """``logits(hidden)`` at the ids ``targets`` ([..., D], [...] -> [...] fp32), one dot per
        position instead of a slice of the [..., V] logits (whose gradient would be [..., V] too)."""
        if self.cfg.text.tie_word_embeddings:
            rows = self.text.embed.embedding[...][targets]
        else:
            rows = jnp.moveaxis(jnp.take(self.lm_head.kernel[...], targets, axis=1), 0, -1)
        dtype = self.text.embed.dtype or rows.dtype
        # fp32 accumulation rounded to the compute dtype, as the logits matmul's output is.
        dot = jnp.einsum("...d,...d->...", hidden.astype(dtype), rows.astype(dtype), preferred_element_type=jnp.float32)
        return dot.astype(dtype).astype(jnp.float32)

    def __call__(self, batch: dict, *, jitter_key: jax.Array | None = None) -> jax.Array:
        """Logits [B, S, V] in fp32. `jitter_key` enables the training-time score jitter."""
        return self.logits(self.hidden_states(batch, jitter_key=jitter_key))


def shifted_targets(labels: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Targets for next-token prediction and their mask; never across packed segments."""
    targets = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE_INDEX)], axis=1)
    same = jnp.concatenate([segment_ids[:, 1:] == segment_ids[:, :-1], jnp.zeros_like(segment_ids[:, :1], bool)], 1)
    valid = (targets != IGNORE_INDEX) & same & (segment_ids != 0)
    return jnp.where(valid, targets, 0), valid


def token_losses(logits: jax.Array, labels: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token cross entropy [B, S] (0 where unsupervised) and the mask."""
    targets, valid = shifted_targets(labels, segment_ids)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.where(valid, nll, 0.0), valid


def lm_loss(logits: jax.Array, labels: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Mean CE over supervised tokens of the batch (HF CausalLM loss)."""
    nll, valid = token_losses(logits, labels, segment_ids)
    return nll.sum() / jnp.maximum(valid.sum(), 1)
