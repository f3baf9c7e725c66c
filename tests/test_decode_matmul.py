"""The decode projections' fused kernels (models/decode_matmul.py, Pallas interpret mode on CPU)
against the model's own modules: RMSNorm, the q/k/v and o projections, Qwen2's MLP and the
residual adds of a decoder layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from manager_jax.models.decode_matmul import (MatmulConfig, matmul_add, norm_gated, norm_qkv, parse_matmul_configs,
                                              supported)
from manager_jax.models.layers import RMSNorm
from manager_jax.models.qwen2 import swiglu

D, I, NQ, NKV = 96, 160, 64, 32  # sizes divisible by 16 and 32 but not by 64: blocks shrink to fit
EPS = 1e-6


def operands(rows: int, dtype, seed: int = 0):
    keys = iter(jax.random.split(jax.random.key(seed), 12))
    normal = lambda shape, s=1.0: (s * jax.random.normal(next(keys), shape)).astype(dtype)
    x = normal((rows, D), 3.0)  # the residual stream: not unit scale, so the norm matters
    norm = RMSNorm(D, EPS, param_dtype=dtype)
    norm.scale[...] = normal((D,), 0.5) + 1
    w = dict(q=normal((D, NQ), 0.1), k=normal((D, NKV), 0.1), v=normal((D, NKV), 0.1), o=normal((NQ, D), 0.1),
             gate=normal((D, I), 0.1), up=normal((D, I), 0.1), down=normal((I, D), 0.1))
    return x, norm, w, normal((rows, NQ)), normal((rows, I))


def expected(x, norm, w, attn_out, act):
    """What the model computes (XLA) for the same inputs."""
    n = norm(x)
    return dict(qkv=jnp.concatenate([n @ w["q"], n @ w["k"], n @ w["v"]], axis=1),
                gated=swiglu(n @ w["gate"], n @ w["up"]),
                o=x + attn_out @ w["o"], down=x + act @ w["down"])


def fused(x, norm, w, attn_out, act, config):
    scale = norm.scale[...]
    return dict(qkv=norm_qkv(x, scale, w["q"], w["k"], w["v"], eps=EPS, config=config, interpret=True),
                gated=norm_gated(x, scale, w["gate"], w["up"], eps=EPS, config=config, interpret=True),
                o=matmul_add(attn_out, w["o"], x, config=config, interpret=True),
                down=matmul_add(act, w["down"], x, config=config, interpret=True))


@pytest.mark.parametrize("rows", [1, 2, 5, 16])
def test_kernels_equal_the_model_in_fp32(rows):
    args = operands(rows, jnp.float32, seed=rows)
    want = expected(*args)
    got = fused(*args, MatmulConfig(block_n=32, block_k=32, num_stages=1))
    for site in want:
        assert got[site].shape == want[site].shape and got[site].dtype == jnp.float32, site
        np.testing.assert_allclose(got[site], want[site], rtol=2e-5, atol=2e-5, err_msg=site)


def test_kernels_round_as_the_model_in_bf16():
    """In bfloat16 the kernels round where the model's ops do (the norm, each product, silu, the
    gate, the residual add): their numbers are XLA's here, but for the rare one that
    a different order of the fp32 sums puts on the other side of a rounding (one bf16 step)."""
    for seed in (7, 8):
        args = operands(2, jnp.bfloat16, seed=seed)
        want = expected(*args)
        # Steps of 32 input rows divide every input; of 64, the last step over 96 or 160 is masked.
        for config in (MatmulConfig(block_k=32), MatmulConfig(block_k=64)):
            got = fused(*args, config)
            for site in want:
                assert got[site].dtype == jnp.bfloat16, site
                g, w = np.asarray(got[site], np.float32), np.asarray(want[site], np.float32)
                step = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(w), 1e-30))) - 7)  # bf16 spacing at w
                assert np.mean(g == w) >= 0.99 and np.max(np.abs(g - w) / step) <= 1, (site, config)


@pytest.mark.parametrize("config", [MatmulConfig(16, 16, 4, 1), MatmulConfig(128, 256, 8, 3), MatmulConfig(32, 64, 2, 2)])
def test_configs_change_the_speed_not_the_result(config):
    """Blocks of 256 and 64 input rows do not divide the inputs (96 and 160): their last loop step
    is masked."""
    args = operands(3, jnp.float32, seed=11)
    want = expected(*args)
    got = fused(*args, config)
    for site in want:
        np.testing.assert_allclose(got[site], want[site], rtol=2e-5, atol=2e-5, err_msg=f"{site} {config}")


@pytest.mark.parametrize("splits, block_k", [(2, 16), (3, 16), (5, 16), (64, 16), (2, 64), (3, 128)])
def test_input_splits_of_the_residual_projections_keep_the_result(splits, block_k):
    """`splits` (o and down): fp32 partial sums over parts of the input, added up with the
    residual by XLA; in fp32 the model's numbers, in bf16 the same roundings (product, then add).
    64 splits: more than the input's blocks, cut to one block each; block_k 64 and 128 do not
    divide the inputs (160 and 64 / 96): the last step of a split is masked."""
    config = MatmulConfig(block_n=16, block_k=block_k, num_stages=1, splits=splits)
    x, norm, w, attn_out, act = operands(3, jnp.float32, seed=splits)
    np.testing.assert_allclose(matmul_add(act, w["down"], x, config=config, interpret=True), x + act @ w["down"],
                               rtol=2e-5, atol=2e-5)
    x, norm, w, attn_out, act = operands(2, jnp.bfloat16, seed=splits)
    got = np.asarray(matmul_add(attn_out, w["o"], x, config=config, interpret=True), np.float32)
    want = np.asarray(x + attn_out @ w["o"], np.float32)
    step = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(want), 1e-30))) - 7)
    assert np.mean(got == want) >= 0.99 and np.max(np.abs(got - want) / step) <= 1
    with pytest.raises(ValueError, match="o and down projections only"):
        norm_gated(x, norm.scale[...], w["gate"], w["up"], eps=EPS, config=config, interpret=True)


def test_sizes_and_configs_are_checked():
    assert supported(896, [896, 128, 128]) and supported(4864, [896]) and supported(96, [160])
    assert not supported(100, [128]) and not supported(128, [72])  # no power-of-two block >= 16 divides
    with pytest.raises(ValueError, match="powers of two >= 16"):
        matmul_add(jnp.ones((2, 100)), jnp.ones((100, 64)), jnp.ones((2, 64)), interpret=True)
    assert parse_matmul_configs("qkv=16,128,4,3; down=32,256,8,4") == {
        "qkv": MatmulConfig(16, 128, 4, 3), "down": MatmulConfig(32, 256, 8, 4)}
    assert str(MatmulConfig(16, 128, 4, 3)) == "16,128,4,3"
    assert parse_matmul_configs("down=16,256,4,4,8") == {"down": MatmulConfig(16, 256, 4, 4, splits=8)}
    assert str(MatmulConfig(16, 256, 4, 4, splits=8)) == "16,256,4,4,8"
    for bad in ("mlp=16,128,4,3", "qkv:16,128,4,3", "qkv=16,128,4", "qkv=16,0,4,3", "down=16,128,4,3,2,1"):
        with pytest.raises(ValueError):
            parse_matmul_configs(bad)


@pytest.mark.parametrize("d", [640, 1024])  # the norm reads 512 columns at a time: a masked last chunk, and none
def test_norm_of_a_wide_input_reads_it_in_chunks(d):
    keys = iter(jax.random.split(jax.random.key(d), 6))
    x = 3.0 * jax.random.normal(next(keys), (3, d))
    norm = RMSNorm(d, EPS, param_dtype=jnp.float32)
    norm.scale[...] = 1 + 0.5 * jax.random.normal(next(keys), (d,))
    wq, wk, wv, wu = (0.05 * jax.random.normal(next(keys), (d, 32)) for _ in range(4))
    config = MatmulConfig(block_n=32, block_k=128, num_stages=1)
    n = norm(x)
    np.testing.assert_allclose(norm_qkv(x, norm.scale[...], wq, wk, wv, eps=EPS, config=config, interpret=True),
                               jnp.concatenate([n @ wq, n @ wk, n @ wv], axis=1), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(norm_gated(x, norm.scale[...], wq, wu, eps=EPS, config=config, interpret=True),
                               swiglu(n @ wq, n @ wu), rtol=2e-5, atol=2e-5)
