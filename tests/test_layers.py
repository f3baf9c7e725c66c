"""The layer stack runner (`models/layers.py run_stacked`): the unrolled layers give the scan's
outputs and gradients, and their gradient is one stacked array per parameter, not a sum of
per-layer pads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from manager_jax.models.layers import RMSNorm, linear, make_stacked, run_stacked


class _Layer(nnx.Module):
    def __init__(self, rngs):
        self.norm = RMSNorm(16, 1e-6, param_dtype=jnp.float32)
        self.proj = linear(16, 16, bias=True, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, x):
        return x + jnp.tanh(self.proj(self.norm(x)))


def _loss_and_state(num_layers=5):
    layers = make_stacked(_Layer, num_layers, nnx.Rngs(0))
    graphdef, state = nnx.split(layers)
    # Non-trivial norm scales, so that every parameter's gradient differs per layer.
    state = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(a.size), a.shape), state)
    x = jax.random.normal(jax.random.key(1), (3, 16))

    def loss(state, scan, start=0, stop=None, remat="dots"):
        body = lambda layer, c, _: (layer(c), None)
        out, _ = run_stacked(nnx.merge(graphdef, state), x, body, scan=scan, remat_policy=remat, start=start, stop=stop)
        return (out**2).sum()

    return loss, state


@pytest.mark.parametrize("start,stop,remat", [(0, None, "dots"), (1, 4, "dots"), (0, None, "none")])
def test_unrolled_layers_give_the_scans_loss_and_gradients(start, stop, remat):
    loss, state = _loss_and_state()
    grad = jax.value_and_grad(loss)
    (want_loss, want), (got_loss, got) = (grad(state, scan, start, stop, remat) for scan in (True, False))
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    # Layers outside [start, stop) get no gradient.
    if stop is not None:
        for g in jax.tree.leaves(got):
            assert not np.any(g[:start]) and not np.any(g[stop:])


def test_unrolled_gradient_is_one_stack_per_parameter_not_a_sum_of_pads():
    loss, state = _loss_and_state()
    jaxpr = str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(state, False))
    assert " pad[" not in jaxpr and "optimization_barrier" in jaxpr
