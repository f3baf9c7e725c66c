"""The fused decode-attention kernels against the XLA decode step they replace.

Off the GPU the kernels run in Pallas interpret mode (the same kernel programs, evaluated by JAX);
the `gpu` test runs them compiled by Triton on a GPU (part of benchmarks/gpu_session.sh's checks).
Expected values come from the decode step written with the model's own pieces: biases, `apply_rope`,
the cache write, then `_xla_attention` with `segment_causal_mask` (`benchmarks/decode_attention.py
xla_step`, which the kernels' benchmark times them against).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.decode_attention import xla_step
from manager_jax.models.decode_attention import (KernelConfig, decode_attention, key_block, num_splits,
                                                 parse_kernel_configs, supported)
from manager_jax.models.qwen2 import rope_cos_sin


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


def new_token(rng, rows, heads, kv, d, dtype=jnp.float32):
    """The decoded token's projections without biases [B, H + 2 KV, d], the biases, and cos / sin
    [B, d] of per-row positions."""
    qkv = jnp.asarray(rng.normal(size=(rows, heads + 2 * kv, d)), dtype)
    biases = tuple(jnp.asarray(rng.normal(size=(n, d)), dtype) for n in (heads, kv, kv))
    positions = jnp.asarray(rng.integers(0, 4000, size=(rows, 1)))
    cos, sin = rope_cos_sin(positions, d, 10000.0, dtype)
    return qkv, biases, cos[:, 0], sin[:, 0]


def both(token, k, v, q_seg, seg, q_slot, layer):
    """(kernel, XLA) results of one decode step: (out, k_cache, v_cache) each."""
    got = decode_attention(*token, k, v, q_seg, seg, q_slot, layer=layer, interpret=True)
    return got, xla_step(*token, k, v, q_seg, seg, q_slot, layer=layer)


@pytest.mark.parametrize("heads,kv,d", [(14, 2, 64), (8, 8, 32), (16, 2, 32)])
def test_kernel_equals_the_xla_step_on_a_left_padded_cache(heads, kv, d):
    rng = np.random.default_rng(heads)
    prompt_slots, slots = 256, 320
    # Rows of very different lengths: the shortest leaves whole key blocks of padding (skipped).
    k, v, seg = left_padded_cache(rng, 3, slots, prompt_slots, [250, 37, 129], kv, d)
    token = new_token(rng, 3, heads, kv, d)
    q_seg = jnp.ones((3,), jnp.int32)
    for q_slot in (prompt_slots, prompt_slots + 41):  # the first decoded token and a later one
        (out, k_out, v_out), (want, k_want, v_want) = both(token, k, v, q_seg, seg, q_slot, 1)
        np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)
        # The new key (bias and RoPE applied) and value are written at the query's slot of its
        # layer, and nothing else changes.
        np.testing.assert_allclose(k_out, k_want, atol=1e-6, rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(k_out) != np.asarray(k), np.asarray(k_want) != np.asarray(k))
        np.testing.assert_allclose(v_out, v_want, atol=1e-6, rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(v_out) != np.asarray(v), np.asarray(v_want) != np.asarray(v))


@pytest.mark.parametrize("config", [KernelConfig(block=32, programs=1), KernelConfig(block=256, programs=64),
                                    KernelConfig(block=64, programs=10_000, num_stages=1),
                                    KernelConfig(block=32, programs=12, num_warps=2),
                                    KernelConfig(block=32, programs=12, peel=0),
                                    KernelConfig(block=32, programs=1, peel=0)])
def test_every_division_of_the_work_gives_the_xla_steps_result(config):
    """One split or many, small key blocks or blocks larger than a split's share of a row's padding;
    splits that share a row's keys unevenly, and one left without keys (the short row, 3 splits)."""
    rng = np.random.default_rng(7)
    k, v, seg = left_padded_cache(rng, 2, 512, 448, [440, 70], 2, 32)
    token = new_token(rng, 2, 4, 2, 32)
    q_seg = jnp.ones((2,), jnp.int32)
    got = decode_attention(*token, k, v, q_seg, seg, 460, layer=0, interpret=True, config=config)
    want = xla_step(*token, k, v, q_seg, seg, 460, layer=0)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5)
    # One split per row and KV head: the main kernel adds the own key itself, and no combine runs.
    one_split = num_splits(512 // key_block(512, config.block), 2 * 2, config.programs) == 1
    step = functools.partial(decode_attention, layer=0, interpret=True, config=config)
    kernels = _pallas_calls(jax.make_jaxpr(step)(*token, k, v, q_seg, seg, 460).jaxpr)
    assert kernels == (["decode_attention"] if one_split else ["decode_attention", "decode_attention_combine"])


@pytest.mark.parametrize("config", [KernelConfig(block=32, programs=12), KernelConfig(block=32, programs=1)])
def test_the_first_block_in_the_loop_or_apart_gives_the_same_bits(config):
    """`KernelConfig.peel` only changes when the first key block is requested: the outputs and the
    written cache are bit for bit those of the peeled kernel, with many splits (one left without
    keys) and with one (no combine; the write after the loop)."""
    rng = np.random.default_rng(11)
    k, v, seg = left_padded_cache(rng, 2, 512, 448, [440, 70], 2, 64, dtype=jnp.bfloat16)
    token = new_token(rng, 2, 14, 2, 64, jnp.bfloat16)
    q_seg = jnp.ones((2,), jnp.int32)
    peeled = decode_attention(*token, k, v, q_seg, seg, 460, layer=0, interpret=True, config=config)
    looped = decode_attention(*token, k, v, q_seg, seg, 460, layer=0, interpret=True,
                              config=dataclasses.replace(config, peel=0))
    for a, b in zip(peeled, looped):
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))


def _pallas_calls(jaxpr) -> list[str]:
    """Names of the Pallas kernels a jaxpr calls, nested jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            found.append(str(eqn.params["name_and_src_info"]).split()[0] if "name_and_src_info" in eqn.params
                         else str(eqn.params.get("name")))
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                found += _pallas_calls(inner)
    return found


def test_kernel_reads_only_the_first_slots_it_is_given_and_ignores_later_ones():
    """kv_seg may cover fewer slots than the cache holds; what the cache holds at or after the
    query's slot (the slot itself is overwritten) changes nothing."""
    rng = np.random.default_rng(1)
    k, v, seg = left_padded_cache(rng, 2, 192, 128, [100, 128], 2, 32)
    token = new_token(rng, 2, 4, 2, 32)
    q_seg = jnp.ones((2,), jnp.int32)
    (got, _, _), (want, _, _) = both(token, k, v, q_seg, seg[:, :144], 130, 0)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    k2, v2 = k.at[:, :, 130:].set(1e4), v.at[:, :, 130:].set(1e4)
    again = decode_attention(*token, k2, v2, q_seg, seg[:, :144], 130, layer=0, interpret=True)[0]
    np.testing.assert_array_equal(got, again)


def test_kernel_in_bf16_is_as_close_to_fp32_as_the_xla_step():
    rng = np.random.default_rng(2)
    k, v, seg = left_padded_cache(rng, 2, 256, 192, [150, 60], 2, 64, dtype=jnp.bfloat16)
    token = new_token(rng, 2, 14, 2, 64, jnp.bfloat16)
    q_seg = jnp.ones((2,), jnp.int32)
    exact = xla_step(*jax.tree.map(lambda x: x.astype(jnp.float32), (*token, k, v)), q_seg, seg, 200, layer=1)[0]
    (got, k_out, _), (xla, k_want, _) = both(token, k, v, q_seg, seg, 200, 1)
    assert got.dtype == k_out.dtype == jnp.bfloat16
    err = float(jnp.abs(got.astype(jnp.float32) - exact).max())
    assert err <= 2 * float(jnp.abs(xla.astype(jnp.float32) - exact).max()) + 1e-2
    # The rotated key may round differently in its last bit (fp32 inside the kernel).
    np.testing.assert_allclose(k_out.astype(jnp.float32), k_want.astype(jnp.float32), atol=0.05, rtol=1e-2)


def test_splits_and_key_blocks():
    assert key_block(4224) == 128 and key_block(4160) == 64 and key_block(80) == 16 and key_block(4100) is None
    assert key_block(4096, 256) == 256 and key_block(4224, 256) == 128 and key_block(4224, 32) == 32
    assert supported(4224, 64) and supported(4224, 128) and not supported(4224, 72) and not supported(4100, 64)
    # 33 blocks of 128 keys: batch 1 decoded as two rows x 2 KV heads -> at most one split per
    # block (33, 132 programs); 16 rows -> 8 splits (256 programs, the nearest to 264).
    assert num_splits(33, 4) == 33 and num_splits(33, 32) == 8 and num_splits(33, 32, 1) == 1
    token = (jnp.zeros((1, 4, 32)), (jnp.zeros((2, 32)), jnp.zeros((1, 32)), jnp.zeros((1, 32))), jnp.zeros((1, 32)),
             jnp.zeros((1, 32)))
    cache = jnp.zeros((1, 1, 40, 1, 32))
    with pytest.raises(ValueError, match="multiple of 16 cache slots"):
        decode_attention(*token, cache, cache, jnp.ones((1,), jnp.int32), jnp.ones((1, 40), jnp.int32), 3, layer=0,
                         interpret=True)


def test_kernel_configs_by_rows_parse_and_print_back():
    configs = parse_kernel_configs("2:128,132,4,2; 16:64,528,8,3,0;4:32,8,4,1,1")
    assert configs == {2: KernelConfig(128, 132, 4, 2), 16: KernelConfig(64, 528, 8, 3, peel=0),
                       4: KernelConfig(32, 8, 4, 1)}
    assert parse_kernel_configs(";".join(f"{r}:{c}" for r, c in configs.items())) == configs
    for bad in ("128,132,4,2", "x:128,132,4,2", "0:128,132,4,2", "2:128,132,4", "2:128,0,4,2", "2:a,b,c,d",
                "2:128,132,4,2,2", "2:128,132,4,2,0,1"):
        with pytest.raises(ValueError, match="kernel config"):
            parse_kernel_configs(bad)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the Triton-compiled kernels need a GPU")
def test_gpu_kernel_equals_the_xla_step_at_the_benchmark_shapes():
    """Qwen2-0.5B's decode step (14 heads, 2 KV heads, d 64) over a 4,224-slot cache, bf16, at the
    benchmark's batch sizes (two rows for batch 1, and 16), with the default divisions of the work
    (`KernelConfig.default_for`) and with one split per (row, KV head) (no combine kernel)."""
    rng = np.random.default_rng(3)
    for rows, config in ((2, KernelConfig.default_for(2)), (16, KernelConfig.default_for(16)),
                         (2, KernelConfig(128, 4, 4, 3)), (16, KernelConfig(128, 32, 4, 4)),
                         (2, KernelConfig(128, 528, 4, 2, peel=0)), (16, KernelConfig(128, 264, 4, 3, peel=0))):
        lengths = list(rng.integers(1000, 4096, size=rows))
        k, v, seg = left_padded_cache(rng, rows, 4224, 4096, lengths, 2, 64, layers=3, dtype=jnp.bfloat16)
        token = new_token(rng, rows, 14, 2, 64, jnp.bfloat16)
        q_seg = jnp.ones((rows,), jnp.int32)
        exact = xla_step(*jax.tree.map(lambda x: x.astype(jnp.float32), (*token, k, v)), q_seg, seg, 4100, layer=2)[0]
        xla, k_want, v_want = xla_step(*token, k, v, q_seg, seg, 4100, layer=2)
        got, k_out, v_out = jax.jit(functools.partial(decode_attention, layer=2, config=config))(*token, k, v, q_seg,
                                                                                                  seg, 4100)
        err = float(jnp.abs(got.astype(jnp.float32) - exact).max())
        assert err <= 2 * float(jnp.abs(xla.astype(jnp.float32) - exact).max()) + 1e-2
        np.testing.assert_allclose(k_out.astype(jnp.float32), k_want.astype(jnp.float32), atol=0.05, rtol=1e-2)
        np.testing.assert_array_equal(v_out, v_want)
