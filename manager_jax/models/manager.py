"""The Manager (SPEC §2): aggregates selected vision layers and adds them to image tokens.

Everything here works on the flat list of image tokens of the batch (the token plan): F [N, T, D]
holds the (projected, layer-embedded, unpadded, resized) multi-layer features of every image token,
`dst` [T] where each token sits in the flattened [B*S] sequence. One injection is a gather of the
current hidden states (adaptive only), a weighted sum over N and one scatter-add.
"""

from __future__ import annotations

from dataclasses import dataclass

import math

import jax
import jax.numpy as jnp
from flax import nnx

from manager_jax.config import ModelConfig
from manager_jax.models.layers import round_to


@dataclass
class ManagerTokens:
    """The per-token inputs of every injection, computed once per forward."""

    features: jax.Array  # [N, T, D]
    dst: jax.Array  # [T] flat index into [B*S]; B*S = dropped
    active: jax.Array  # [T] bool: token receives the update
    image: jax.Array  # [T] int32 image index (jitter / per-image fallback query), -1 = padding
    query_mask: jax.Array | None  # [B, S] bool, adaptive last/average/cross only
    segment_ids: jax.Array | None  # [B, S] packed samples of a row
    num_images: int  # static bound on image indices


jax.tree_util.register_dataclass(
    ManagerTokens, data_fields=["features", "dst", "active", "image", "query_mask", "segment_ids"], meta_fields=["num_images"]
)


def _product(a: jax.Array, b: jax.Array, dtype) -> jax.Array:
    """a * b rounded to `dtype` (fp32 result; exact before the rounding for 16-bit inputs): the
    elementwise products that torch rounds to bf16 / fp16 before its sum."""
    return round_to(a.astype(jnp.float32) * b.astype(jnp.float32), dtype)


def _layer_sum(weights: jax.Array, feats: jax.Array) -> jax.Array:
    """sum_n weights[n] * F[n] -> [T, D] as `torch.sum(scores * feats, dim=1)` (SPEC §2.7): each
    product rounded to the compute dtype, summed in fp32, rounded once."""
    return jnp.sum(_product(weights, feats, feats.dtype), axis=0).astype(feats.dtype)


class StaticBlock(nnx.Module):
    """StaticManagerZeroInit: out = sum_n scores[n] * F[n]."""

    def __init__(self, num_layers: int, dim: int, *, param_dtype):
        self.layer_scores = nnx.Param(jnp.zeros((num_layers, dim), param_dtype))

    def weights(self, feats, q, tokens, h_flat, jitter):
        scores = self.layer_scores[...].astype(feats.dtype)  # [N, D]
        if jitter is not None:  # one draw per image, shape [N, D] each (torch: [1, N, 1, D])
            return _jittered_sum(scores, jitter, tokens.image.clip(0), feats)
        return _layer_sum(scores[:, None, :], feats)


@jax.checkpoint
def _jittered_sum(scores, jitter, image, feats):
    """sum_n (scores[n] * jitter[image[t], n]) * F[n, t] -> [T, D] (training only: the jitter is
    noise). Rematerialised: the per-token scores [T, N, D] are remade in the backward pass rather
    than kept, one such array per injection (the 72B recipe's 20 injections kept 20 of 3.25 GiB
    each per chip). One contraction, whose products are not rounded before the fp32 sum as torch's
    are: written as rounded products and a sum, the 0.5B stage-2 step took 4.8 GiB more per v5p chip."""
    return jnp.einsum("tnd,ntd->td", scores[None] * jitter[image], feats)


class AdaptiveBlock(nnx.Module):
    """AdaptiveManagerZeroInit: per-token weights from a linear controller over the current state."""

    def __init__(self, num_layers: int, dim: int, query_type: str, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.query_type = query_type
        din = dim if query_type == "none" else 2 * dim
        self.controller = nnx.Linear(din, num_layers, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                                     kernel_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.zero_gate = nnx.Param(jnp.zeros((num_layers, dim), param_dtype))
        if query_type == "cross":
            # As the controller: the original's from_pretrained builds them and, missing from its
            # checkpoint, gives them Qwen2's _init_weights (normal(0, 0.02), zero bias).
            self.fusion_q, self.fusion_k = (
                nnx.Linear(dim, dim, use_bias=True, dtype=dtype, param_dtype=param_dtype,
                           kernel_init=nnx.initializers.normal(0.02), bias_init=nnx.initializers.zeros_init(),
                           rngs=rngs)
                for _ in range(2))

    def _extra(self, q, tokens: ManagerTokens, h_flat):
        """The controller's extra input per token [T, D] (SPEC §2.7 last / average / cross): each
        image token reads the query of its own sample, a (row, packed segment) pair; an image whose
        sample has no query reads its own tokens instead."""
        s = tokens.query_mask.shape[1]
        b_s = h_flat.shape[0]
        qm = tokens.query_mask.reshape(-1)  # [B*S]
        pos = jnp.arange(b_s)
        group = (pos // s) * (s + 1) + tokens.segment_ids.reshape(-1)  # the sample of each position
        img = tokens.image.clip(0)
        n_img = tokens.num_images
        placed = tokens.dst < b_s  # not padding, not cut off by truncation
        image_group = jax.ops.segment_max(jnp.where(placed, group[jnp.where(placed, tokens.dst, 0)], -1), img, n_img)
        # [n_img, B*S]: the query positions each image reads; per image, not per row, so that a
        # packed row's samples stay apart and the arrays stay small.
        query_of = qm[None, :] & (group[None, :] == image_group[:, None])
        has_query = query_of.any(axis=1)[img]  # [T]
        tok_w = tokens.active.astype(q.dtype)
        if self.query_type in ("last", "average"):
            if self.query_type == "average":
                # torch.mean: an fp32 sum and division, rounded once.
                f32 = jnp.float32
                sums = jnp.dot(query_of.astype(f32), h_flat.astype(f32), precision=jax.lax.Precision.HIGHEST)
                e_sample = (sums / jnp.maximum(query_of.sum(1), 1).astype(f32)[:, None]).astype(q.dtype)
                e_img = (jax.ops.segment_sum(q.astype(f32) * tok_w[:, None], img, n_img) / jnp.maximum(
                    jax.ops.segment_sum(tok_w.astype(f32), img, n_img), 1)[:, None]).astype(q.dtype)
            else:
                e_sample = h_flat[jnp.max(jnp.where(query_of, pos, 0), axis=1)]
                last_tok = jax.ops.segment_max(jnp.where(tokens.active, jnp.arange(q.shape[0]), -1), img, n_img)
                e_img = q[jnp.clip(last_tok, 0)]
            return jnp.where(has_query[:, None], e_sample[img], e_img[img])
        # cross: attention of each image token over its sample's query tokens (or its own image).
        d = q.shape[-1]
        qp = self.fusion_q(q)
        kq = self.fusion_k(h_flat)  # [B*S, D]

        def scaled(logits):
            # torch: the matmul rounded, divided by the fp32 math.sqrt(D), rounded again
            return round_to(logits.astype(jnp.float32) / math.sqrt(d), logits.dtype)

        def softmax(logits, ok):  # torch.softmax of a 16-bit tensor: fp32 math, rounded once
            return jax.nn.softmax(jnp.where(ok, logits, -jnp.inf), axis=-1).astype(q.dtype)

        key_ok = query_of[img]
        att = softmax(scaled(qp @ kq.T), key_ok)
        ctx_query = jnp.where(has_query[:, None], jnp.nan_to_num(att) @ h_flat, 0)
        kt = self.fusion_k(q)
        same = (img[:, None] == img[None, :]) & tokens.active[None, :]
        att_img = softmax(scaled(qp @ kt.T), same)
        ctx_img = jnp.nan_to_num(att_img) @ q
        return jnp.where(has_query[:, None], ctx_query, ctx_img)

    def weights(self, feats, q, tokens, h_flat, jitter):
        if self.query_type == "none":
            ctrl_in = q
        else:
            ctrl_in = jnp.concatenate([self._extra(q, tokens, h_flat), q], axis=-1)
        # [T, N]: fp32 accumulation rounded once, as torch's linear, stated rather than left to the
        # backend (jax 0.11's CPU backend summed this bf16 dot, transposed into s.T, in bf16).
        dtype = self.controller.dtype or ctrl_in.dtype
        s = jnp.dot(ctrl_in.astype(dtype), self.controller.kernel[...].astype(dtype),
                    preferred_element_type=jnp.float32).astype(dtype)
        # torch: ((scores * jitter) * zero_gate) * F, each product rounded, then the fp32 sum.
        w = s.T[:, :, None]  # [N, T, 1]
        if jitter is not None:  # [N, T, D] per token (torch: [B, N, L, D])
            w = _product(w, jitter, feats.dtype)
        w = _product(w, self.zero_gate[...].astype(feats.dtype)[:, None, :], feats.dtype)  # [N, T, D]
        return _layer_sum(w, feats)


class Manager(nnx.Module):
    """All injection blocks plus the shared per-layer embedding."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        m = cfg.manager
        dim = cfg.text.hidden_size
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        n = cfg.num_manager_layers
        self.num_layers = n
        self.jitter_eps = m.jitter_eps
        self.layer_embedding = nnx.Param(jax.random.normal(rngs.params(), (n, dim), param_dtype) / jnp.sqrt(dim))
        blocks = []
        for layer in cfg.injection_layers():
            if layer == 0:  # layer-0 special case: the last selected layer is dropped (SPEC §2.2)
                blocks.append(StaticBlock(n - 1, dim, param_dtype=param_dtype))
            elif m.query_type is None:
                blocks.append(StaticBlock(n, dim, param_dtype=param_dtype))
            else:
                blocks.append(AdaptiveBlock(n, dim, m.query_type, dtype=dtype, param_dtype=param_dtype, rngs=rngs))
        self.blocks = nnx.List(blocks)

    def inject(self, j: int, h: jax.Array, tokens: ManagerTokens, jitter_key: jax.Array | None) -> jax.Array:
        """h [B, S, D] -> h with manager j's update added at the active image tokens."""
        block = self.blocks[j]
        b, s, d = h.shape
        h_flat = h.reshape(b * s, d)
        feats = tokens.features.astype(h.dtype)
        q = h_flat.at[tokens.dst].get(mode="fill", fill_value=0)  # current states at the image tokens
        jitter = None
        if isinstance(block, StaticBlock):
            feats = feats[: block.layer_scores.shape[0]]
            if jitter_key is not None:
                shape = (tokens.num_images,) + block.layer_scores.shape
                jitter = self._uniform(jitter_key, shape, h.dtype)
        elif jitter_key is not None:
            jitter = self._uniform(jitter_key, feats.shape, h.dtype)
        out = block.weights(feats, q, tokens, h_flat, jitter)
        out = jnp.where(tokens.active[:, None], out, 0).astype(h.dtype)
        return h_flat.at[tokens.dst].add(out, mode="drop").reshape(b, s, d)

    def _uniform(self, key, shape, dtype):
        return jax.random.uniform(key, shape, dtype, 1 - self.jitter_eps, 1 + self.jitter_eps)
