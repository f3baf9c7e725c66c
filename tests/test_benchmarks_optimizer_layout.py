"""benchmarks/optimizer_layout.py compares two programs; they must do the same update, or the
comparison says nothing. On CPU with small shapes: per-layer arrays and layer stacks give the same
parameters and Adam moments."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import optimizer_layout

LAYERS = 3


def _per_layer(tree):
    return jax.tree.map(lambda a: tuple(a[i] for i in range(LAYERS)), tree)


def _adam_state(opt):
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
    return next(s for s in jax.tree.leaves(opt, is_leaf=is_adam) if is_adam(s))


def test_per_layer_and_stacked_updates_agree():
    tx, step = optimizer_layout.update_step()
    rng = np.random.default_rng(0)
    stacked = {"w": jnp.asarray(rng.normal(size=(LAYERS, 4, 8)), jnp.float32),
               "b": jnp.asarray(rng.normal(size=(LAYERS, 8)), jnp.float32)}
    grads = jax.tree.map(lambda a: jnp.asarray(3 * rng.normal(size=a.shape), jnp.bfloat16), stacked)  # norm > 1: clipped
    new, opt = jax.jit(step)(stacked, grads, tx.init(stacked))
    split = _per_layer(stacked)
    new_split, opt_split = jax.jit(step)(split, _per_layer(grads), tx.init(split))
    adam, adam_split = _adam_state(opt), _adam_state(opt_split)
    for name in stacked:
        assert not np.allclose(np.asarray(new[name]), np.asarray(stacked[name]))  # the update moved them
        for i in range(LAYERS):
            pairs = [(new_split[name][i], new[name][i]), (adam_split.mu[name][i], adam.mu[name][i]),
                     (adam_split.nu[name][i], adam.nu[name][i])]
            for got, want in pairs:
                np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-8)
