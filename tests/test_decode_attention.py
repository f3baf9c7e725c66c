"""The fused decode-attention kernel against the XLA attention path it replaces.

Off the GPU the kernel runs in Pallas interpret mode (the same kernel program, evaluated by JAX);
the `gpu` test runs it compiled by Triton on a GPU (part of benchmarks/gpu_session.sh's checks).
Expected values come from `_xla_attention` with `segment_causal_mask`, the decode steps' XLA path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from manager_jax.models.attention import _xla_attention, segment_causal_mask
from manager_jax.models.decode_attention import decode_attention, key_block, num_splits, supported


def xla_decode(q, k_cache, v_cache, q_seg, kv_seg, q_slot, layer):
    s = kv_seg.shape[1]
    mask = segment_causal_mask(jnp.asarray([q_slot]), jnp.arange(s), q_seg[:, None], kv_seg)
    k, v = k_cache[layer, :, :s], v_cache[layer, :, :s]
    return _xla_attention(q[:, None], k, v, mask, q.shape[-1] ** -0.5)[:, 0]


def left_padded_cache(rng, rows, slots, prompt_slots, lengths, kv, d, layers=2, dtype=jnp.float32):
    """A decode-time cache: row b's prompt at [prompt_slots - lengths[b], prompt_slots), new tokens
    from prompt_slots on (the engine's layout); padding slots hold large values, so a kernel that
    read them as keys would be far off."""
    seg = np.zeros((rows, slots), np.int32)
    for b, n in enumerate(lengths):
        seg[b, prompt_slots - n:prompt_slots] = 1
    seg[:, prompt_slots:] = 1
    k = rng.normal(size=(layers, rows, slots, kv, d))
    v = rng.normal(size=(layers, rows, slots, kv, d))
    pad = (seg == 0)[None, :, :, None, None]
    k, v = np.where(pad, 50.0, k), np.where(pad, -50.0, v)
    return jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(seg)


@pytest.mark.parametrize("heads,kv,d", [(14, 2, 64), (8, 8, 32), (16, 2, 16)])
def test_kernel_equals_the_xla_path_on_a_left_padded_cache(heads, kv, d):
    rng = np.random.default_rng(heads)
    prompt_slots, slots = 256, 320
    # Rows of very different lengths: the shortest leaves whole key blocks of padding (skipped).
    k, v, seg = left_padded_cache(rng, 3, slots, prompt_slots, [250, 37, 129], kv, d)
    q = jnp.asarray(rng.normal(size=(3, heads, d)), jnp.float32)
    q_seg = jnp.ones((3,), jnp.int32)
    for q_slot in (prompt_slots, prompt_slots + 41):  # the first decoded token and a later one
        got = decode_attention(q, k, v, q_seg, seg, q_slot, layer=1, interpret=True)
        want = xla_decode(q, k, v, q_seg, seg, q_slot, 1)
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_kernel_reads_only_the_first_slots_it_is_given_and_ignores_later_ones():
    """kv_seg may cover fewer slots than the cache holds; slots after the query are never seen."""
    rng = np.random.default_rng(1)
    k, v, seg = left_padded_cache(rng, 2, 192, 128, [100, 128], 2, 32)
    q = jnp.asarray(rng.normal(size=(2, 4, 32)), jnp.float32)
    q_seg = jnp.ones((2,), jnp.int32)
    got = decode_attention(q, k, v, q_seg, seg[:, :144], 130, layer=0, interpret=True)
    np.testing.assert_allclose(got, xla_decode(q, k, v, q_seg, seg[:, :144], 130, 0), atol=2e-5, rtol=2e-5)
    # Changing what lies after the query's slot changes nothing.
    k2 = k.at[:, :, 131:].set(1e4)
    v2 = v.at[:, :, 131:].set(1e4)
    np.testing.assert_array_equal(got, decode_attention(q, k2, v2, q_seg, seg[:, :144], 130, layer=0, interpret=True))


def test_kernel_in_bf16_is_as_close_to_fp32_as_the_xla_path():
    rng = np.random.default_rng(2)
    k, v, seg = left_padded_cache(rng, 2, 256, 192, [150, 60], 2, 64, dtype=jnp.bfloat16)
    q = jnp.asarray(rng.normal(size=(2, 14, 64)), jnp.bfloat16)
    q_seg = jnp.ones((2,), jnp.int32)
    exact = xla_decode(*(x.astype(jnp.float32) for x in (q, k, v)), q_seg, seg, 200, 1)
    got = decode_attention(q, k, v, q_seg, seg, 200, layer=1, interpret=True)
    xla = xla_decode(q, k, v, q_seg, seg, 200, 1)
    assert got.dtype == jnp.bfloat16
    err = float(jnp.abs(got.astype(jnp.float32) - exact).max())
    assert err <= 2 * float(jnp.abs(xla.astype(jnp.float32) - exact).max()) + 1e-2


def test_splits_and_key_blocks():
    assert key_block(4224) == 128 and key_block(4160) == 64 and key_block(80) == 16 and key_block(4100) is None
    assert supported(4224, 64) and supported(4224, 128) and not supported(4224, 72) and not supported(4100, 64)
    # 33 blocks of 128 keys: batch 1 decoded as two rows x 2 KV heads -> 33 splits (132 programs);
    # 16 rows -> 11 splits (352 programs, the divisor nearest 264).
    assert num_splits(33, 4) == 33 and num_splits(33, 32) == 11
    with pytest.raises(ValueError, match="multiple of 16 cache slots"):
        decode_attention(jnp.zeros((1, 2, 16)), jnp.zeros((1, 1, 40, 1, 16)), jnp.zeros((1, 1, 40, 1, 16)),
                         jnp.ones((1,), jnp.int32), jnp.ones((1, 40), jnp.int32), 3, layer=0, interpret=True)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the Triton-compiled kernel needs a GPU")
def test_gpu_kernel_equals_the_xla_path_at_the_benchmark_shapes():
    """Qwen2-0.5B's decode attention (14 heads, 2 KV heads, d 64) over a 4,224-slot cache, bf16, at
    the benchmark's batch sizes (two rows for batch 1, and 16)."""
    rng = np.random.default_rng(3)
    for rows in (2, 16):
        lengths = list(rng.integers(1000, 4096, size=rows))
        k, v, seg = left_padded_cache(rng, rows, 4224, 4096, lengths, 2, 64, layers=3, dtype=jnp.bfloat16)
        q = jnp.asarray(rng.normal(size=(rows, 14, 64)), jnp.bfloat16)
        q_seg = jnp.ones((rows,), jnp.int32)
        got = decode_attention(q, k, v, q_seg, seg, 4100, layer=2).astype(jnp.float32)
        exact = xla_decode(*(x.astype(jnp.float32) for x in (q, k, v)), q_seg, seg, 4100, 2)
        xla = xla_decode(q, k, v, q_seg, seg, 4100, 2).astype(jnp.float32)
        assert float(jnp.abs(got - exact).max()) <= 2 * float(jnp.abs(xla - exact).max()) + 1e-2
