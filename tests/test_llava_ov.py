"""Model-level behaviour that the parity tests do not cover: scan vs unrolled layers, remat,
packing (segments never see each other), training jitter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from manager_jax import config as C
from manager_jax.data.conversation import IMAGE_TOKEN_INDEX as IMG
from manager_jax.models.llava_ov import LlavaOV, lm_loss, token_losses
from manager_jax.reference.parity import SampleSpec, build_case, relative_error


def _randomize(model, seed=0):
    """Random non-zero values for every parameter (the Manager's zero init would hide bugs)."""
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        noise = rng.normal(scale=0.1, size=var.shape).astype(np.float32)
        var[...] = jnp.asarray(noise + (1.0 if path[-1] == "scale" else 0.0))
    return model


def _model(cfg, seed=0):
    return _randomize(LlavaOV(cfg, rngs=nnx.Rngs(seed)), seed)


def _samples(seed=0):
    rng = np.random.default_rng(seed)
    t = lambda n: [int(v) for v in rng.integers(1, 400, n)]
    return [SampleSpec(t(5) + [IMG] + t(20), [(500, 300)]), SampleSpec(t(30)), SampleSpec(t(3) + [IMG] + t(7), [(300, 300)])]


@pytest.fixture(scope="module")
def cfg():
    return C.tiny("grid_manager", image=C.ImageConfig(grid_pinpoints=[(384, 384), (768, 384), (384, 768)]))


def test_scan_equals_unrolled_and_remat_keeps_gradients(cfg):
    rng = np.random.default_rng(5)
    ids = [int(v) for v in rng.integers(1, 400, 8)]
    case = build_case(cfg, [SampleSpec(ids[:3] + [IMG] + ids[3:], [(300, 300)]), SampleSpec(ids)])
    batch = jax.tree.map(jnp.asarray, case.batch.to_model_inputs())
    scanned = _model(cfg)
    unrolled = _model(cfg.replace(scan_layers=False))
    np.testing.assert_allclose(np.asarray(scanned(batch)), np.asarray(unrolled(batch)), rtol=1e-5, atol=1e-5)

    def grads(model):
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(p):
            m = nnx.merge(graphdef, p)
            return lm_loss(m(batch), batch["labels"], batch["segment_ids"])

        return jax.jit(jax.grad(loss))(params)

    remat = _model(cfg.replace(remat_policy="full"))
    g0, g1 = grads(scanned), grads(remat)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(g0["manager"]["blocks"][0]["layer_scores"][...]).sum()) > 0  # gradients reach the Manager


def test_remat_dots_acts_unrolled_on_padded_crops_keeps_loss_and_gradients(cfg):
    """The GPU training candidate: remat "dots_acts" (MLP activations and attention inputs kept),
    unrolled layers, crops padded for the vision tower: the loss and every gradient of the plain
    scanned model without remat."""
    case = build_case(cfg, _samples(3))
    batch = jax.tree.map(jnp.asarray, case.batch.to_model_inputs())

    def loss_and_grads(model):
        graphdef, params = nnx.split(model, nnx.Param)
        loss = lambda p: lm_loss(nnx.merge(graphdef, p)(batch), batch["labels"], batch["segment_ids"])
        return jax.jit(jax.value_and_grad(loss))(params)

    want_loss, want = loss_and_grads(_model(cfg))
    got_loss, got = loss_and_grads(_model(cfg.replace(remat_policy="dots_acts", scan_layers=False,
                                                      vision_token_multiple=64)))
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


class TowerCase:
    """Crops, the selected layers and fixed random weights of a loss over the tower's outputs; `run`
    gives a tower's (last, selected) hidden states and the gradients of that loss."""

    def __init__(self, cfg):
        rng = np.random.default_rng(7)
        self.pixels = jnp.asarray(rng.normal(size=(3, 384, 384, 3)).astype(np.float32))
        self.select = list(cfg.manager.select_layers)
        self.w_last = jnp.asarray(rng.normal(size=(3, 729, cfg.vision.hidden_size)).astype(np.float32))
        self.w_sel = jnp.asarray(rng.normal(size=(len(self.select), 3, 729, cfg.vision.hidden_size)).astype(np.float32))

    def run(self, model):
        graphdef, params = nnx.split(model.vision, nnx.Param)

        def loss(p):
            last, selected = nnx.merge(graphdef, p)(self.pixels, self.select)
            return (last * self.w_last).sum() + (selected * self.w_sel).sum(), (last, selected)

        (_, outs), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return outs, grads


@pytest.fixture(scope="module")
def unpadded_tower(cfg):
    """The tower without padding on the TowerCase: (case, (last, selected), gradients), computed once
    for every padded variant it is compared with."""
    case = TowerCase(cfg)
    return case, *case.run(_model(cfg.replace(vision_token_multiple=1)))


@pytest.mark.parametrize("multiple", [64, 100, "splash"])
def test_vision_tower_on_padded_crops_equals_the_unpadded_tower(cfg, unpadded_tower, multiple):
    """vision_token_multiple pads every crop once for all the tower's layers (729 -> 768 for cuDNN
    on GPU): the last and the Manager's selected hidden states and every gradient stay the same.
    "splash": the TPU path (Pallas interpret mode here), crops padded to 768 by the tower itself
    and attended by the unmasked Splash kernel with the padding in its own segment."""
    from jax.sharding import Mesh

    from manager_jax.models import attention as A

    case, (last0, sel0), g0 = unpadded_tower
    select = case.select
    assert 0 in select or min(select) <= 1  # the embeddings / first layers are among the outputs
    if multiple == "splash":
        mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
        with A.sharded_attention(A.AttentionMesh(mesh)):
            model = _model(cfg.replace(attention_impl="splash"))
            assert A.unmasked_row_multiple("splash") == 128
            jaxpr = str(jax.make_jaxpr(lambda x: model.vision(x, select))(case.pixels))
            assert "pallas_call" in jaxpr  # the kernel runs
            (last1, sel1), g1 = case.run(model)
    else:
        (last1, sel1), g1 = case.run(_model(cfg.replace(vision_token_multiple=multiple)))
    assert last1.shape == last0.shape == (3, 729, cfg.vision.hidden_size) and sel1.shape == sel0.shape
    # fp32 rounding only (other reduction orders): a leak of the padding would be O(1).
    assert relative_error(last1, last0) < 1e-6 and relative_error(sel1, sel0) < 1e-6
    # Leaves whose true gradient is zero (the key bias: softmax ignores a shift shared by all keys)
    # hold rounding noise only; they are held to a floor relative to the whole gradient.
    floor = 1e-2 * float(np.sqrt(sum(np.sum(np.square(b)) for b in jax.tree.leaves(g0))))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g0)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.linalg.norm(a - b) <= 1e-5 * max(np.linalg.norm(b), floor), jax.tree_util.keystr(path)


def test_packed_rows_give_the_same_per_sample_losses(cfg):
    """Three samples packed into one row vs one sample per row: equal per-sample losses."""
    model = _model(cfg, seed=1)
    unpacked = build_case(cfg, _samples(1)).batch
    packed = build_case(cfg, _samples(1), pack=True).batch
    assert packed.segment_ids.shape[0] == 1 and packed.segment_ids.max() == 3

    def per_sample(batch):
        b = jax.tree.map(jnp.asarray, batch.to_model_inputs())
        nll, valid = token_losses(model(b), b["labels"], b["segment_ids"])
        nll, valid, seg = np.asarray(nll), np.asarray(valid), batch.segment_ids
        return [float(nll[r][seg[r] == k].sum() / valid[r][seg[r] == k].sum())
                for r in range(seg.shape[0]) for k in range(1, seg[r].max() + 1)]

    np.testing.assert_allclose(per_sample(packed), per_sample(unpacked), rtol=2e-5)


def test_training_jitter(cfg):
    case = build_case(cfg, _samples(2))
    batch = jax.tree.map(jnp.asarray, case.batch.to_model_inputs())
    model = _model(cfg, seed=2)
    plain = np.asarray(model(batch))
    np.testing.assert_array_equal(plain, np.asarray(model(batch)))  # no key: deterministic evaluation
    j1 = np.asarray(model(batch, jitter_key=jax.random.key(1)))
    j2 = np.asarray(model(batch, jitter_key=jax.random.key(2)))
    assert 0 < relative_error(j1, plain, case.valid) < 0.05  # small multiplicative noise
    assert relative_error(j1, j2, case.valid) > 0
    # Row 1 is text-only: no Manager update, no jitter.
    np.testing.assert_array_equal(j1[1], plain[1])


def test_plain_causal_flag_keeps_causal_attention_on_every_backend(cfg):
    """`plain_causal=True` only selects a kernel; the result must equal the masked path."""
    case = build_case(cfg, [SampleSpec([int(v) for v in np.arange(1, 40)])])
    batch = jax.tree.map(jnp.asarray, case.batch.to_model_inputs())
    model = _model(cfg, seed=3)
    for impl in ("auto", "xla"):
        model.text.layers.attn.impl = impl
        np.testing.assert_allclose(np.asarray(model.hidden_states(batch, plain_causal=True)),
                                   np.asarray(model.hidden_states(batch)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("manager_type", ["adaptive_last_zerouni", "adaptive_average_zerouni", "adaptive_cross_zerouni"])
def test_packed_rows_with_an_adaptive_extra_query_give_the_same_per_sample_logits(cfg, manager_type):
    """Two chat samples with an image each packed into one row vs one per row: each image must read
    its own sample's query text (SPEC §2.7), not the row's."""
    ims, ime, nl = 450, 451, 198
    rng = np.random.default_rng(8)
    t = lambda n: [int(v) for v in rng.integers(1, 400, n)]
    chat = lambda: [ims] + t(3) + [ime, nl, ims, 7, nl] + t(4) + [IMG] + t(6) + [ime, nl, ims, 8, nl] + t(3) + [ime, nl]
    samples = [SampleSpec(chat(), [(500, 300)]), SampleSpec(chat(), [(300, 300)])]
    mcfg = cfg.replace(manager=C.ManagerConfig(type=manager_type, vision_select_layers_start=1,
                                               vision_select_layers_end=3, injection_start=0, injection_interval=1))
    model = _model(mcfg, seed=4)
    unpacked = build_case(mcfg, samples, im_start_id=ims).batch
    packed = build_case(mcfg, samples, im_start_id=ims, pack=True).batch
    assert packed.query_mask[0, packed.segment_ids[0] == 2].any()  # the second sample has a query
    got = np.asarray(model(jax.tree.map(jnp.asarray, packed.to_model_inputs())))
    want = np.asarray(model(jax.tree.map(jnp.asarray, unpacked.to_model_inputs())))
    for k in (1, 2):
        ours = got[0][packed.segment_ids[0] == k]
        assert relative_error(ours, want[k - 1][unpacked.segment_ids[k - 1] != 0]) < 1e-5, k
