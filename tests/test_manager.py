"""Manager injection math against an independent numpy transcription of SPEC §2.6-§2.7."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from manager_jax import config as C
from manager_jax.models.manager import AdaptiveBlock, Manager, ManagerTokens, StaticBlock

B, S, D, T = 2, 40, 64, 12


def _setup(manager_type, seed=0, with_query=True):
    cfg = C.tiny(manager_type=manager_type)
    mgr = Manager(cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    # Random non-zero parameters everywhere (zero-init would hide bugs).
    for path, var in nnx.to_flat_state(nnx.state(mgr, nnx.Param)):
        var[...] = jnp.asarray(rng.normal(size=var.shape).astype(np.float32))
    n = cfg.num_manager_layers
    feats = rng.normal(size=(n, T, D)).astype(np.float32)
    # Two images: tokens 0..6 -> sample 0 at positions 5..11, tokens 7..11 -> sample 1 at 20..24.
    dst = np.concatenate([np.arange(5, 12), S + np.arange(20, 25)]).astype(np.int32)
    image = np.array([0] * 7 + [1] * 5, np.int32)
    active = np.ones(T, bool)
    active[3] = False  # e.g. a newline of a "main" grid type
    qmask = np.zeros((B, S), bool)
    if with_query:
        qmask[0, 14:18] = True
        qmask[1, 30:33] = True
    h = rng.normal(size=(B, S, D)).astype(np.float32)
    tokens = ManagerTokens(jnp.asarray(feats), jnp.asarray(dst), jnp.asarray(active), jnp.asarray(image),
                           jnp.asarray(qmask), jnp.ones((B, S), jnp.int32), num_images=2)
    return cfg, mgr, tokens, h, dict(feats=feats, dst=dst, image=image, active=active, qmask=qmask)


def _np_params(block):
    return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(block, nnx.Param))}


def test_static_injection_and_layer0_drops_last_selected_layer():
    cfg, mgr, tokens, h, d = _setup("static_zerouni")
    for j in range(len(cfg.injection_layers())):
        out = np.asarray(mgr.inject(j, jnp.asarray(h), tokens, None))
        scores = np.asarray(mgr.blocks[j].layer_scores[...])
        n_used = cfg.num_manager_layers - 1 if cfg.injection_layers()[j] == 0 else cfg.num_manager_layers
        assert scores.shape[0] == n_used
        expect = h.reshape(B * S, D).copy()
        for t in range(T):
            if d["active"][t]:
                expect[d["dst"][t]] += sum(scores[n] * d["feats"][n, t] for n in range(n_used))
        np.testing.assert_allclose(out.reshape(B * S, D), expect, rtol=1e-5, atol=1e-5)


def test_static_jitter_is_per_image_and_bounded():
    cfg, mgr, tokens, h, d = _setup("static_zerouni")
    j = 1  # not the layer-0 manager
    scores = np.zeros_like(np.asarray(mgr.blocks[j].layer_scores[...]))
    scores[2] = 1.0  # a single layer contributes: the update equals jitter * F[2]
    mgr.blocks[j].layer_scores[...] = jnp.asarray(scores)
    out = np.asarray(mgr.inject(j, jnp.asarray(h), tokens, jax.random.key(3))).reshape(B * S, D)
    delta = out - h.reshape(B * S, D)
    ratio = np.stack([delta[d["dst"][t]] / d["feats"][2, t] for t in range(T) if d["active"][t]])
    assert np.all((ratio >= 0.99 - 1e-5) & (ratio < 1.01 + 1e-5))
    assert ratio.std() > 1e-4  # really random
    img = d["image"][d["active"]]
    # one draw per image, shared by all tokens of that image (torch: shape [1, N, 1, D] per call)
    np.testing.assert_allclose(ratio[img == 0], np.broadcast_to(ratio[img == 0][0], ratio[img == 0].shape), rtol=1e-5)
    assert not np.allclose(ratio[img == 0][0], ratio[img == 1][0])
    again = np.asarray(mgr.inject(j, jnp.asarray(h), tokens, jax.random.key(3))).reshape(B * S, D)
    np.testing.assert_array_equal(out, again)


def test_jittered_injection_gradients_are_the_plain_formulas():
    """The jittered weighted sum is rematerialised (its [T, N, D] per-token scores are not kept for
    the backward pass); its gradients for the scores and the features are still the plain ones:
    d/dF[n, t] = scores[n] * jitter[img(t), n] * g[t] and d/dscores[n] = sum_t jitter * F[n, t] * g[t]."""
    cfg, mgr, tokens, h, d = _setup("static_zerouni")
    j, key = 1, jax.random.key(5)
    g = jnp.asarray(np.random.default_rng(1).normal(size=(B * S, D)).astype(np.float32))
    graphdef, params = nnx.split(mgr)

    def loss(params, feats):
        out = nnx.merge(graphdef, params).inject(j, jnp.asarray(h), dataclasses.replace(tokens, features=feats), key)
        return jnp.sum(out.reshape(B * S, D) * g)

    d_params, d_feats = jax.grad(loss, argnums=(0, 1))(params, tokens.features)
    d_scores = nnx.to_pure_dict(d_params)["blocks"][j]["layer_scores"]
    scores = mgr.blocks[j].layer_scores[...]
    jitter = np.asarray(mgr._uniform(key, (tokens.num_images,) + scores.shape, jnp.float32))[d["image"]]  # [T, N, D]
    g_tok = np.where(d["active"][:, None], np.asarray(g)[d["dst"]], 0.0)  # [T, D]
    want_feats = np.asarray(scores)[:, None, :] * jitter.transpose(1, 0, 2) * g_tok[None]
    want_scores = np.einsum("tnd,ntd,td->nd", jitter, d["feats"], g_tok)
    np.testing.assert_allclose(np.asarray(d_feats), want_feats, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(d_scores), want_scores, rtol=1e-4, atol=1e-4)


def _np_adaptive(query_type, p, q, h_flat, d, n):
    """Reference: S = controller([extra, Q]); out = sum_n S * zero_gate * F (SPEC §2.7)."""
    w = p["controller/kernel"]  # [in, N]
    gate = p["zero_gate"]
    out = np.zeros((T, D), np.float32)
    for img in (0, 1):
        toks = [t for t in range(T) if d["image"][t] == img and d["active"][t]]
        sample = d["dst"][toks[0]] // S
        qpos = np.nonzero(d["qmask"][sample])[0] + sample * S
        Q = q[toks]
        E = h_flat[qpos] if len(qpos) else Q  # empty query: Q itself is the extra query
        if query_type == "none":
            ctrl = Q
        elif query_type == "last":
            ctrl = np.concatenate([np.broadcast_to(E[-1], Q.shape), Q], -1)
        elif query_type == "average":
            ctrl = np.concatenate([np.broadcast_to(E.mean(0), Q.shape), Q], -1)
        else:
            qp = Q @ p["fusion_q/kernel"] + p["fusion_q/bias"]
            kp = E @ p["fusion_k/kernel"] + p["fusion_k/bias"]
            logits = qp @ kp.T / np.sqrt(D)
            att = np.exp(logits - logits.max(-1, keepdims=True))
            att /= att.sum(-1, keepdims=True)
            ctrl = np.concatenate([att @ E, Q], -1)
        s = ctrl @ w  # [L, N]
        for i, t in enumerate(toks):
            out[t] = sum(s[i, k] * gate[k] * d["feats"][k, t] for k in range(n))
    return out


@pytest.mark.parametrize("manager_type", ["adaptive_zerouni", "adaptive_last_zerouni",
                                          "adaptive_average_zerouni", "adaptive_cross_zerouni"])
@pytest.mark.parametrize("with_query", [True, False])
def test_adaptive_injection_matches_numpy(manager_type, with_query):
    cfg, mgr, tokens, h, d = _setup(manager_type, with_query=with_query)
    assert isinstance(mgr.blocks[0], StaticBlock)  # layer 0 is static even for adaptive types
    j = 1
    block = mgr.blocks[j]
    assert isinstance(block, AdaptiveBlock)
    h_flat = h.reshape(B * S, D)
    q = h_flat[np.minimum(d["dst"], B * S - 1)]
    expect_delta = _np_adaptive(cfg.manager.query_type, _np_params(block), q, h_flat, d, cfg.num_manager_layers)
    expect = h_flat.copy()
    for t in range(T):
        expect[d["dst"][t]] += expect_delta[t]
    out = np.asarray(mgr.inject(j, jnp.asarray(h), tokens, None)).reshape(B * S, D)
    np.testing.assert_allclose(out, expect, rtol=2e-4, atol=2e-4)


def test_manager_parameter_count_default_static():
    """SPEC §2.2: 80,640 parameters for the default static manager at 0.5B shapes."""
    mgr = nnx.eval_shape(lambda: Manager(C.preset("0.5b", "grid_manager"), rngs=nnx.Rngs(0)))
    count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(mgr, nnx.Param)))
    assert count == 12 * 896 + 5 * 13 * 896 + 13 * 896


def test_fresh_parameters_are_initialised_as_the_originals_are():
    """What the original's from_pretrained leaves in the Manager and projector it trains from scratch,
    against torch doing the same: the projector is built after the checkpoint loads (nn.Linear's own
    init, biases U(+-1/sqrt(fan_in)); ours had zero biases); the adaptive_cross fusion projections
    are built inside from_pretrained, missing from its checkpoint, so Qwen2's _init_weights draws
    them (normal(0, 0.02), zero biases; ours were nn.Linear-like)."""
    import torch
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2PreTrainedModel

    from manager_jax.models.llava_ov import Projector

    dim = 256
    ours = Projector(dim, dim, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    torch.manual_seed(0)
    theirs = torch.nn.Linear(dim, dim)
    for name in ("kernel", "bias"):
        a = np.asarray(getattr(ours.linear1, name)[...]).ravel()
        b = getattr(theirs, "weight" if name == "kernel" else "bias").detach().numpy().ravel()
        assert abs(a).max() <= abs(b).max() * 1.05 and abs(a).max() > abs(b).max() * 0.9, name
        assert a.std() == pytest.approx(b.std(), rel=0.1), name

    block = AdaptiveBlock(4, dim, "cross", dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(1))
    fresh = torch.nn.Linear(dim, dim)
    Qwen2PreTrainedModel._init_weights(Qwen2PreTrainedModel(Qwen2Config(initializer_range=0.02)), fresh)
    for layer in (block.fusion_q, block.fusion_k):
        assert np.asarray(layer.kernel[...]).std() == pytest.approx(fresh.weight.detach().numpy().std(), rel=0.05)
        assert not np.asarray(layer.bias[...]).any() and not fresh.bias.detach().numpy().any()
