"""Attention dispatch: the blocked XLA path equals one full softmax, with masks of every shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from manager_jax.models import attention as A


def _naive(q, k, v, mask):
    """Plain per-head softmax attention in numpy (GQA by repeating k/v)."""
    h, kv = q.shape[2], k.shape[2]
    k, v = np.repeat(k, h // kv, axis=2), np.repeat(v, h // kv, axis=2)
    logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(mask, logits, -1e30)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


@pytest.mark.parametrize("block", [7, 16, 64])
def test_blocked_attention_equals_full_softmax(block, monkeypatch):
    monkeypatch.setattr(A, "QUERY_BLOCK", block)
    rng = np.random.default_rng(0)
    b, t, h, kv, d = 2, 37, 4, 2, 8
    q, k, v = (rng.normal(size=(b, t, n, d)).astype(np.float32) for n in (h, kv, kv))
    seg = np.ones((b, t), np.int32)
    seg[0, 20:] = 2  # two packed segments in row 0
    seg[1, 30:] = 0  # padding in row 1
    slots = jnp.arange(t)
    mask = A.segment_causal_mask(slots, slots, jnp.asarray(seg), jnp.asarray(seg))
    got = A.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=mask, impl="xla")
    np.testing.assert_allclose(np.asarray(got), _naive(q, k, v, np.asarray(mask)), rtol=1e-5, atol=1e-5)
    causal = A.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=None, impl="auto",
                                     plain_causal=True)
    tri = np.tril(np.ones((t, t), bool))[None, None]
    np.testing.assert_allclose(np.asarray(causal), _naive(q, k, v, tri), rtol=1e-5, atol=1e-5)
    # Gradients through the rematerialised blocks equal those of one unblocked softmax.
    loss = lambda fn: jax.grad(lambda x: (fn(x) ** 2).sum())(jnp.asarray(q))
    blocked = loss(lambda x: A.dot_product_attention(x, jnp.asarray(k), jnp.asarray(v), mask=mask))
    full = loss(lambda x: A._xla_attention(x, jnp.asarray(k), jnp.asarray(v), mask, d**-0.5))
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(full), rtol=1e-4, atol=1e-5)
