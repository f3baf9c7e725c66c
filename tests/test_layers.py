"""The layer stack runner (`models/layers.py run_stacked`): the unrolled layers give the scan's
outputs and gradients, and their gradient is one stacked array per parameter, not a sum of
per-layer pads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from manager_jax.models.layers import RMSNorm, linear, make_stacked, run_stacked, split_stack


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


def test_a_stack_run_in_pieces_from_one_split_has_one_gradient_stack():
    """The Manager runs the decoder in pieces between its injections: from one `split_stack`, the
    pieces' gradients are one stack per parameter (no pads, one barrier per leaf), and equal the scan's."""
    layers = make_stacked(_Layer, 5, nnx.Rngs(0))
    graphdef, state = nnx.split(layers)
    x = jax.random.normal(jax.random.key(1), (3, 16))
    body = lambda layer, c, _: (layer(c), None)

    def loss(state, scan):
        stack = nnx.merge(graphdef, state)
        pieces = stack if scan else split_stack(stack)
        for a, b in ((0, 2), (2, 3), (3, 5)):
            x_ = x if a == 0 else c
            c, _ = run_stacked(pieces, x_, body, start=a, stop=b, scan=scan, remat_policy="dots")
        return (c**2).sum()

    jaxpr = str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(state, False))
    assert " pad[" not in jaxpr and jaxpr.count("optimization_barrier") == len(jax.tree.leaves(state))
    for g, w in zip(jax.tree.leaves(jax.grad(loss)(state, False)), jax.tree.leaves(jax.grad(loss)(state, True))):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="runs unrolled"):
        run_stacked(split_stack(layers), x, body, scan=True)


def test_remat_dots_acts_keeps_the_mlp_activation_and_the_attention_inputs(capsys):
    """What each remat policy saves for the backward pass of a SigLIP layer on padded crops: "dots"
    the matmul outputs only; "dots_acts" also the GELU output, the attention's masked inputs and
    output, the two layer norms' outputs and the second norm's input (the residual sum after the
    attention), and no longer the q/k/v projections they are made from."""
    from manager_jax.config import tiny
    from manager_jax.models.layers import _REMAT_POLICIES
    from manager_jax.models.siglip import SiglipLayer

    vision = tiny("grid").vision
    layer = SiglipLayer(vision, dtype=jnp.float32, param_dtype=jnp.float32, impl="xla", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 16, vision.hidden_size))
    graphdef, params = nnx.split(layer)
    loss = lambda p, x: nnx.merge(graphdef, p)(x, valid_len=12).sum()
    saved = {}
    for policy in ("dots", "dots_acts"):
        jax.ad_checkpoint.print_saved_residuals(jax.checkpoint(loss, policy=_REMAT_POLICIES[policy]), params, x)
        saved[policy] = capsys.readouterr().out
    for name in ("mlp_activation", "attention_io", "norm_output", "residual_sum"):
        assert f"named '{name}'" not in saved["dots"]
    assert saved["dots_acts"].count("named 'mlp_activation'") == 1
    assert saved["dots_acts"].count("named 'attention_io'") == 4  # q, k, v and the masked output
    assert saved["dots_acts"].count("named 'norm_output'") == 2  # ln1, ln2
    assert saved["dots_acts"].count("named 'residual_sum'") == 1  # ln2's input: its backward needs it
    dots = lambda text: text.count("output of dot_general")
    assert dots(saved["dots_acts"]) < dots(saved["dots"])


@pytest.mark.parametrize("fn, kwargs", [(jax.nn.gelu, {"approximate": True}), (jax.nn.gelu, {"approximate": False}),
                                        (jax.nn.silu, {})])
def test_fp32_activation_value_and_gradient_are_the_fp32_math_rounded_once(fn, kwargs):
    """activation() keeps its bf16 input for the backward pass (its own VJP); value and gradient
    must equal autodiff of the plain formula: fp32 math on the bf16 values, rounded once."""
    from manager_jax.models.layers import activation

    x = (3 * jax.random.normal(jax.random.key(0), (64, 96))).astype(jnp.bfloat16)
    g = jax.random.normal(jax.random.key(1), (64, 96)).astype(jnp.bfloat16)
    plain = lambda v: fn(v.astype(jnp.float32), **kwargs).astype(v.dtype)
    y, vjp = jax.vjp(lambda v: activation(fn, v, **kwargs), x)
    y_ref, vjp_ref = jax.vjp(plain, x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
    np.testing.assert_array_equal(np.asarray(vjp(g)[0], np.float32), np.asarray(vjp_ref(g)[0], np.float32))
    # and not the bf16 math it replaced
    assert not np.array_equal(np.asarray(y, np.float32), np.asarray(fn(x, **kwargs), np.float32))
