"""Attention dispatch: one entry point for every attention in the model.

`xla` is the reference path (any backend, arbitrary masks, fp32 softmax as the PyTorch eager code).
`cudnn` uses `jax.nn.dot_product_attention(implementation="cudnn")` (GPU flash attention); it is taken
only where the mask is plain causal or full, and `auto` picks it on GPU for those cases. A TPU
Splash kernel plugs in here later.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)
# The XLA path handles queries in blocks of this many positions (rematerialised), so its fp32 scores
# are [block, S] rather than [S, S]: 16k-token training rows fit without a fused kernel.
QUERY_BLOCK = 2048


def segment_causal_mask(
    q_slot: jax.Array, kv_slot: jax.Array, q_seg: jax.Array, kv_seg: jax.Array, causal: bool = True
) -> jax.Array:
    """Boolean mask [B, 1, T, S]: same segment and (if causal) key slot <= query slot.

    Slots are positions in the physical sequence / KV cache (not RoPE positions), so packed rows and
    left-padded caches use the same rule. Padding (segment 0) attends to padding, which keeps every
    softmax row non-empty.
    """
    mask = q_seg[:, :, None] == kv_seg[:, None, :]
    if causal:
        mask = mask & (kv_slot[None, None, :] <= q_slot[None, :, None])
    return mask[:, None]


def _xla_attention(q, k, v, mask, scale):
    """Reference attention with fp32 softmax; GQA groups folded into the query axis.

    [B, KV, G*T, d] x [B, KV, S, d] keeps every einsum a plain batched matmul (the 5-D
    [B, T, KV, G, d] form was about 3x slower on CPU).
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    g = h // kv
    q = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, d)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, S, d]
    logits = jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        s = k.shape[2]
        m = mask.reshape(b, kv, g, t, s) if mask.shape[1] == h else mask[:, :, None]  # [B, KV|1, G|1, T, S]
        logits = jnp.where(m, logits.reshape(b, kv, g, t, s), NEG_INF).reshape(b, kv, g * t, s)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, kv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None,
    impl: str = "auto",
    plain_causal: bool = False,
) -> jax.Array:
    """q [B,T,H,d], k/v [B,S,KV,d] (GQA when KV < H) -> [B,T,H,d].

    `plain_causal=True` promises the caller's mask is exactly causal (single segment, no padding
    inside the row), which lets the cuDNN kernel run without an explicit mask.
    """
    scale = q.shape[-1] ** -0.5
    if impl == "auto":
        impl = "cudnn" if (jax.default_backend() == "gpu" and plain_causal) else "xla"
    if impl == "cudnn":
        if not plain_causal and mask is not None:
            raise ValueError("attention_impl='cudnn' supports causal (unpacked) attention only")
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=plain_causal, implementation="cudnn"
        )
    if mask is None and plain_causal:
        t, s = q.shape[1], k.shape[1]
        mask = (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None] + (s - t))[None, None]
    return _blocked_attention(q, k, v, mask, scale, QUERY_BLOCK)


def _blocked_attention(q, k, v, mask, scale, block):
    """`_xla_attention` over query blocks (exact: every block sees all keys), rematerialised."""
    b, t, h, d = q.shape
    if t <= block:
        return _xla_attention(q, k, v, mask, scale)
    n = -(-t // block)
    pad = n * block - t
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, n, block, h, d).swapaxes(0, 1)
    if mask is not None:
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad), (0, 0)), constant_values=True)
        mask = mask.reshape(mask.shape[:2] + (n, block, mask.shape[-1])).transpose(2, 0, 1, 3, 4)
    step = jax.checkpoint(lambda qm: _xla_attention(qm[0], k, v, qm[1], scale))
    out = jax.lax.map(step, (q, mask))  # [n, B, block, H, d]
    return out.swapaxes(0, 1).reshape(b, n * block, h, d)[:, :t]
