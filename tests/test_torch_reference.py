"""Tests of the PyTorch reference (manager_jax.reference.torch_manager) on tiny fp32 models.

Expected values come from HF transformers' own LlavaOnevision forward, from SPEC.md's worked
token counts, or from numpy re-computations written here; never from the reference itself.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from manager_jax.reference.hf_tiny import tiny_hf_config, tiny_hf_model
from manager_jax.reference.torch_manager import (
    ManagerSettings,
    init_manager_params,
    manager_param_shapes,
    reference_from_hf_and_manager,
)

IMG = 500  # image token id of the tiny config
IMS, IME, NL = 502, 503, 504  # stand-ins for <|im_start|>, <|im_end|>, "\n"
HIDDEN = 64
SELECT = [1, 2, 3]  # hidden_states indices of the 4-layer tiny tower; 3 is the last selected layer
INJECT = [0, 2]


@pytest.fixture(scope="module")
def hf_sdpa():
    return tiny_hf_model(tiny_hf_config(), seed=0, attn_implementation="sdpa")


@pytest.fixture(scope="module")
def hf_eager():
    return tiny_hf_model(tiny_hf_config(), seed=0, attn_implementation="eager")


def settings(**kw) -> ManagerSettings:
    base = dict(select_layers=SELECT, injection_layers=INJECT, im_start_id=IMS)
    base.update(kw)
    return ManagerSettings(**base)


def make_ref(hf, st: ManagerSettings, nonzero: bool, seed: int = 1):
    return reference_from_hf_and_manager(hf, init_manager_params(st, HIDDEN, seed=seed, nonzero=nonzero), st)


def pixels(n_images: int, n_crops: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n_images, n_crops, 3, 384, 384, generator=torch.Generator().manual_seed(seed))


def pad_rows(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r)
        mask[b, : len(r)] = 1
    return ids, mask


def chat_row(counts: list[int], before: list[int] = (), after: list[int] = (20, 21, 22)) -> list[int]:
    """system turn, then user: `before` "\n" images (separated by a space id) "\n" `after`, then assistant."""
    row = [IMS, 10, NL, 11, 12, IME, NL, IMS, 13, NL]
    if before:
        row += list(before) + [NL]
    for k, t in enumerate(counts):
        row += ([15] if k else []) + [IMG] * t
    row += [NL] + list(after) + [IME, NL, IMS, 14, NL, 30, 31]
    return row


def labels_for(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool() & (ids != IMG), ids, torch.full_like(ids, -100))


# ---------------------------------------------------------------- geometry and parameters
def test_token_counts_match_spec_worked_examples(hf_sdpa):
    """SPEC §3.7 table (original convention) and the §3.9 #1 rounding example."""
    ref = make_ref(hf_sdpa, settings(), nonzero=False)
    wh = [(384, 384), (640, 480), (1024, 899), (1920, 1080), (4000, 1000), (1647, 1281)]
    counts = ref.image_token_counts([(h, w) for w, h in wh])
    assert counts == [1485, 2929, 6551, 7269, 7249, 7332]
    geo = ref.image_geometry((1080, 1920))
    assert (geo.grid_hw, geo.unpadded_hw, geo.resized_hw) == ((3, 5), (75, 135), (60, 108))
    ref_hf = make_ref(hf_sdpa, settings(convention="hf"), nonzero=False)
    assert ref_hf.image_token_counts([(1281, 1647)]) == [7261]
    # Single-crop images: the original adds no newline, HF adds one; the Manager keeps 729.
    assert make_ref(hf_sdpa, settings(image_aspect_ratio="pad"), False).image_token_counts([(5, 7)]) == [729]
    assert ref_hf.image_token_counts([(5, 7), (9, 3)], batch_num_images=[2]) == [730, 730]
    assert ref_hf.image_geometry((5, 7), single_crop=True).manager_len == 729


def test_manager_param_shapes_follow_spec():
    """SPEC §2.2: the 0.5B static default has 80,640 parameters; layer 0 keeps N-1 scores."""
    st = ManagerSettings()
    shapes = manager_param_shapes(st, 896)
    assert shapes["model.manager.0.layer_scores"] == (1, 12, 1, 896)
    assert shapes["model.manager.5.layer_scores"] == (1, 13, 1, 896)
    assert shapes["model.manager_layer_embedding"] == (13, 896)
    assert sum(math.prod(s) for s in shapes.values()) == 80640  # scores + layer embedding
    cross = manager_param_shapes(ManagerSettings(manager_type="adaptive_cross_zerouni"), 896)
    assert cross["model.manager.0.layer_scores"] == (1, 12, 1, 896)
    assert cross["model.manager.1.linear_controller.weight"] == (13, 1792)
    assert cross["model.manager.1.zero_gate"] == (1, 13, 1, 896)
    assert cross["model.manager.3.fusion_attention.q_proj.weight"] == (896, 896)
    assert cross["model.manager.3.fusion_attention.k_proj.bias"] == (896,)
    plain = manager_param_shapes(ManagerSettings(manager_type="adaptive_zerouni"), 896)
    assert plain["model.manager.2.linear_controller.weight"] == (13, 896)
    assert not any("fusion" in k for k in plain)
    params = init_manager_params(ManagerSettings(manager_type="adaptive_last_zerouni"), 32, nonzero=True)
    assert all(bool((v != 0).all()) for v in params.values())
    zero = init_manager_params(ManagerSettings(manager_type="adaptive_last_zerouni"), 32, nonzero=False)
    assert all(not zero[k].any() for k in zero if k.endswith(("layer_scores", "zero_gate")))


def test_bad_inputs_raise(hf_sdpa):
    st = settings()
    params = init_manager_params(st, HIDDEN, nonzero=False)
    del params["model.manager.1.layer_scores"]
    with pytest.raises(ValueError, match="missing"):
        reference_from_hf_and_manager(hf_sdpa, params, st)
    with pytest.raises(ValueError, match="manager_type"):
        settings(manager_type="static")
    with pytest.raises(ValueError, match="out of range"):
        make_ref(hf_sdpa, settings(select_layers=[1, 5]), False)
    ref = make_ref(hf_sdpa, settings(image_aspect_ratio="square", merge_type="flat"), False)
    ids, _ = pad_rows([[1] + [IMG] * 728 + [2]])
    with pytest.raises(ValueError, match="image tokens"):
        ref(ids, pixels(1, 1), [(384, 384)])


# ---------------------------------------------------------------- parity with HF (zero manager)
def test_main_features_equal_hf_and_manager_features_align(hf_sdpa):
    """Our main features equal HF get_image_features; the Manager grid features are assembled the
    same way (a selected layer equal to the last one, with a zero layer embedding, gives them back)."""
    for grid_type in ("all", "grid", "main"):
        # HF comparison on three sizes (max_9 resize, the rounding case, plain unpad); alignment on one.
        sizes_hw = [(1080, 1920), (1281, 1647), (480, 640)] if grid_type == "all" else [(1080, 1920)]
        st = settings(convention="hf", grid_type=grid_type, select_layers=[2, 4])
        params = init_manager_params(st, HIDDEN, nonzero=False)
        params["model.manager_layer_embedding"][1] = 0.0
        ref = reference_from_hf_and_manager(hf_sdpa, params, st)
        n_crops = [ref.image_geometry(s).n_crops for s in sizes_hw]
        pix = pixels(len(sizes_hw), max(n_crops))
        with torch.no_grad():
            ours, multi = ref.image_features(pix, torch.tensor(sizes_hw))
            if grid_type == "all":
                theirs = hf_sdpa.model.get_image_features(pix, torch.tensor(sizes_hw)).pooler_output
                for a, b in zip(ours, theirs):
                    assert a.shape == b.shape
                    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        for main, mgr in zip(ours, multi):
            expected = {"all": main, "grid": main[729:], "main": main[:729]}[grid_type]
            torch.testing.assert_close(mgr[1], expected, rtol=0, atol=1e-6)


def _hf_logits(hf, ids, mask, labels, **kw):
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, labels=labels, **kw)
    return out.logits.float(), out.loss


def test_zero_manager_matches_hf_anyres_1920x1080(hf_sdpa):
    st = settings(convention="hf", manager_type="static_zerouni", grid_type="all")
    ref = make_ref(hf_sdpa, st, nonzero=False)
    sizes = torch.tensor([[1080, 1920]])
    (t,) = ref.image_token_counts(sizes)
    assert t == 7269
    ids, mask = pad_rows([chat_row([t])])
    labels = labels_for(ids, mask)
    pix = pixels(1, 16)
    with torch.no_grad():
        logits, loss = ref(ids, pix, sizes, attention_mask=mask, labels=labels)
    hf_logits, hf_loss = _hf_logits(hf_sdpa, ids, mask, labels, pixel_values=pix, image_sizes=sizes)
    torch.testing.assert_close(logits, hf_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, hf_loss, rtol=1e-5, atol=1e-6)


def test_zero_manager_matches_hf_image_and_text_only_rows(hf_eager):
    st = settings(convention="hf", manager_type="adaptive_cross_zerouni", grid_type="grid")
    ref = make_ref(hf_eager, st, nonzero=False)
    sizes = torch.tensor([[300, 500]])
    (t,) = ref.image_token_counts(sizes)
    ids, mask = pad_rows([chat_row([t]), [IMS, 10, NL, 11, 12, 13, IME, NL]])
    labels = labels_for(ids, mask)
    pix = pixels(1, ref.image_geometry((300, 500)).n_crops)
    with torch.no_grad():
        logits, loss = ref(ids, pix, sizes, attention_mask=mask, labels=labels)
    hf_logits, hf_loss = _hf_logits(hf_eager, ids, mask, labels, pixel_values=pix, image_sizes=sizes)
    valid = mask.bool()
    torch.testing.assert_close(logits[valid], hf_logits[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, hf_loss, rtol=1e-5, atol=1e-6)


def test_zero_manager_matches_hf_multi_image_pad(hf_eager):
    st = settings(convention="hf", manager_type="adaptive_last_zerouni")
    ref = make_ref(hf_eager, st, nonzero=False)
    sizes = torch.tensor([[300, 500], [700, 200]])
    counts = ref.image_token_counts(sizes, batch_num_images=[2])
    assert counts == [730, 730]
    ids, mask = pad_rows([chat_row(counts)])
    pix = pixels(2, 3)
    with torch.no_grad():
        logits, _ = ref(ids, pix, sizes, attention_mask=mask, batch_num_images=[2])
    hf_logits, _ = _hf_logits(hf_eager, ids, mask, None, pixel_values=pix, image_sizes=sizes,
                              batch_num_images=torch.tensor([2]))
    torch.testing.assert_close(logits, hf_logits, rtol=1e-5, atol=1e-5)


def test_zero_manager_matches_hf_square_single_crop(hf_eager):
    """HF has no square mode; feed it its own packing of one crop (pack_image_features)."""
    st = settings(convention="hf", manager_type="adaptive_average_zerouni", image_aspect_ratio="square")
    ref = make_ref(hf_eager, st, nonzero=False)
    sizes = torch.tensor([[384, 384]])
    (t,) = ref.image_token_counts(sizes)
    assert t == 730
    ids, mask = pad_rows([[IMG] * t + [20, 21, 22, NL]])
    pix = pixels(1, 1)
    model = hf_eager.model
    with torch.no_grad():
        logits, _ = ref(ids, pix, sizes, attention_mask=mask)
        last = model.vision_tower(pix[0], output_hidden_states=True).hidden_states[-1]  # before post-LN
        crop_features = model.multi_modal_projector(last)
        packed, _ = model.pack_image_features([crop_features], sizes, image_newline=model.image_newline)
        encoded = {"image": BaseModelOutputWithPooling(pooler_output=packed)}
    hf_logits, _ = _hf_logits(hf_eager, ids, mask, None, mm_encoder_outputs=encoded)
    torch.testing.assert_close(logits, hf_logits, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- manager effects
CAUSAL_CASES = [
    # (settings kwargs, image (H, W) list, batch_num_images, expected first changed offset from image start)
    (dict(manager_type="static_zerouni", grid_type="all"), [(384, 384)], None, 0),
    (dict(manager_type="static_zerouni", grid_type="grid"), [(384, 384)], None, 729),
    (dict(manager_type="adaptive_cross_zerouni", grid_type="main"), [(300, 500)], None, 0),
    (dict(manager_type="adaptive_last_zerouni", grid_type="grid", injection_layers=[1, 3]), [(384, 384)], None, 729),
    (dict(manager_type="adaptive_zerouni", image_aspect_ratio="square", merge_type="flat"), [(9, 9)], None, 0),
    (dict(manager_type="adaptive_average_zerouni", image_aspect_ratio="pad"), [(5, 6), (6, 5)], [2], 0),
]


@pytest.mark.parametrize("kw, sizes_hw, per_row, first", CAUSAL_CASES)
def test_manager_changes_logits_only_from_its_first_update(hf_sdpa, kw, sizes_hw, per_row, first):
    st = settings(**kw)
    ref0, ref1 = make_ref(hf_sdpa, st, nonzero=False), make_ref(hf_sdpa, st, nonzero=True)
    counts = ref0.image_token_counts(sizes_hw, per_row)
    ids, mask = pad_rows([chat_row(counts, before=[40, 41])])
    start = ids[0].tolist().index(IMG)
    n_crops = max(ref0.image_geometry(s, per_row is not None).n_crops for s in sizes_hw)
    pix = pixels(len(sizes_hw), n_crops)
    with torch.no_grad():
        base, _ = ref0(ids, pix, sizes_hw, attention_mask=mask, batch_num_images=per_row)
        changed, _ = ref1(ids, pix, sizes_hw, attention_mask=mask, batch_num_images=per_row)
    moved = (changed - base).abs().amax(-1)[0] > 1e-5
    assert int(moved.nonzero()[0]) == start + first
    assert float((changed - base)[0, : start + first].abs().max()) == 0.0
    assert bool(moved[-1])


def test_layer0_manager_ignores_last_selected_layer(hf_sdpa):
    """Perturb only the last selected layer's features (its layer-embedding row)."""
    st = settings(image_aspect_ratio="square", merge_type="flat")
    params = init_manager_params(st, HIDDEN, seed=3, nonzero=True)
    sizes = [(384, 384)]
    ids, mask = pad_rows([[1, 2] + [IMG] * 729 + [3, 4]])
    pix = pixels(1, 1)

    def run(p):
        with torch.no_grad():
            return reference_from_hf_and_manager(hf_sdpa, p, st)(ids, pix, sizes, attention_mask=mask)[0]

    def perturbed(p, row):
        q = {k: v.clone() for k, v in p.items()}
        q["model.manager_layer_embedding"][row] += 1.0
        return q

    only0 = dict(params, **{"model.manager.1.layer_scores": torch.zeros(1, 3, 1, HIDDEN)})
    torch.testing.assert_close(run(perturbed(only0, 2)), run(only0), rtol=0, atol=0)
    assert float((run(perturbed(only0, 1)) - run(only0)).abs().max()) > 1e-3
    only1 = dict(params, **{"model.manager.0.layer_scores": torch.zeros(1, 2, 1, HIDDEN)})
    only1["model.manager.1.layer_scores"] = torch.zeros(1, 3, 1, HIDDEN)
    only1["model.manager.1.layer_scores"][:, 2] = 0.7
    assert float((run(perturbed(only1, 2)) - run(only1)).abs().max()) > 1e-3


# ---------------------------------------------------------------- numpy hand computations
def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _np_manager_features(hf, pix: torch.Tensor, params: dict, select: list[int]):
    """(main [729, D], F [N, 729, D]) of one crop, in numpy from HF's tower hidden states."""
    with torch.no_grad():
        states = hf.model.vision_tower(pix[0, :1], output_hidden_states=True).hidden_states
    proj = hf.model.multi_modal_projector
    erf = np.vectorize(math.erf)

    def project(x):
        y = x @ _np(proj.linear_1.weight).T + _np(proj.linear_1.bias)
        y = 0.5 * y * (1.0 + erf(y / math.sqrt(2.0)))
        return y @ _np(proj.linear_2.weight).T + _np(proj.linear_2.bias)

    main = project(_np(states[-1][0]))
    emb = _np(params["model.manager_layer_embedding"])
    feats = np.stack([project(_np(states[k][0])) + emb[n] for n, k in enumerate(select)])
    return main, feats


def _capture(hf, layer: int):
    """Hooks recording the input of decoder `layer` and the output of the layer before it."""
    seen = {}
    layers = hf.model.language_model.layers
    hooks = [layers[layer].register_forward_pre_hook(lambda m, a: seen.__setitem__("post", a[0].clone()))]
    if layer > 0:
        hooks.append(layers[layer - 1].register_forward_hook(lambda m, a, o: seen.__setitem__("pre", o.clone())))
    return seen, hooks


def test_static_injections_match_numpy(hf_sdpa):
    st = settings(image_aspect_ratio="square", merge_type="flat")
    params = init_manager_params(st, HIDDEN, seed=5, nonzero=True)
    ref = reference_from_hf_and_manager(hf_sdpa, params, st)
    row = [7, 8, 9] + [IMG] * 729 + [20, 21]
    ids, mask = pad_rows([row])
    pix = pixels(1, 1)
    main, feats = _np_manager_features(hf_sdpa, pix, params, SELECT)
    s = 3
    seen0, hooks0 = _capture(hf_sdpa, 0)
    seen2, hooks2 = _capture(hf_sdpa, 2)
    try:
        with torch.no_grad():
            ref(ids, pix, [(384, 384)], attention_mask=mask)
    finally:
        for hk in hooks0 + hooks2:
            hk.remove()
    # Layer 0: embeddings, image features scattered, plus the manager over the first N-1 layers.
    expected = _np(hf_sdpa.model.language_model.embed_tokens.weight)[np.array(row)]
    scores0 = _np(params["model.manager.0.layer_scores"])[0, :, 0]  # [N-1, D]
    expected[s : s + 729] = main + (scores0[:, None, :] * feats[:-1]).sum(0)
    np.testing.assert_allclose(_np(seen0["post"][0]), expected, rtol=0, atol=1e-5)
    # Layer 2: every selected layer, added to the output of layer 1 at the image positions only.
    scores1 = _np(params["model.manager.1.layer_scores"])[0, :, 0]
    delta = np.zeros_like(expected)
    delta[s : s + 729] = (scores1[:, None, :] * feats).sum(0)
    np.testing.assert_allclose(_np(seen2["post"][0] - seen2["pre"][0]), delta, rtol=0, atol=1e-5)


@pytest.mark.parametrize("manager_type", ["adaptive_zerouni", "adaptive_last_zerouni",
                                          "adaptive_average_zerouni", "adaptive_cross_zerouni"])
def test_adaptive_injection_matches_numpy(hf_sdpa, manager_type):
    """Layer-2 adaptive manager; the extra query is "40 41" before and "20 21 22" after the image."""
    st = settings(manager_type=manager_type, image_aspect_ratio="square", merge_type="flat")
    params = init_manager_params(st, HIDDEN, seed=7, nonzero=True)
    ref = reference_from_hf_and_manager(hf_sdpa, params, st)
    row = chat_row([729], before=[40, 41])
    ids, mask = pad_rows([row])
    s = row.index(IMG)
    query_pos = [row.index(40), row.index(41)] + [s + 729 + 1 + k for k in range(3)]
    assert [row[p] for p in query_pos] == [40, 41, 20, 21, 22]
    pix = pixels(1, 1)
    _, feats = _np_manager_features(hf_sdpa, pix, params, SELECT)
    seen, hooks = _capture(hf_sdpa, 2)
    try:
        with torch.no_grad():
            ref(ids, pix, [(384, 384)], attention_mask=mask)
    finally:
        for hk in hooks:
            hk.remove()
    pre = _np(seen["pre"][0])
    q, e = pre[s : s + 729], pre[query_pos]
    w = _np(params["model.manager.1.linear_controller.weight"])
    gate = _np(params["model.manager.1.zero_gate"])[0, :, 0]  # [N, D]
    if manager_type == "adaptive_zerouni":
        fused = q
    elif manager_type == "adaptive_cross_zerouni":
        prefix = "model.manager.1.fusion_attention."
        qq = q @ _np(params[prefix + "q_proj.weight"]).T + _np(params[prefix + "q_proj.bias"])
        kk = e @ _np(params[prefix + "k_proj.weight"]).T + _np(params[prefix + "k_proj.bias"])
        att = qq @ kk.T / math.sqrt(HIDDEN)
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        fused = np.concatenate([att @ e, q], axis=-1)
    else:
        pooled = e[-1] if manager_type == "adaptive_last_zerouni" else e.mean(0)
        fused = np.concatenate([np.broadcast_to(pooled, q.shape), q], axis=-1)
    scores = fused @ w.T  # [L, N]
    delta = np.zeros_like(pre)
    delta[s : s + 729] = np.einsum("ln,nd,nld->ld", scores, gate, feats)
    np.testing.assert_allclose(_np(seen["post"][0]) - pre, delta, rtol=0, atol=2e-5)


# ---------------------------------------------------------------- truncation and jitter
@pytest.mark.parametrize("manager_type", ["static_zerouni", "adaptive_zerouni"])
def test_truncation_inside_an_image_clips_the_update(hf_sdpa, manager_type):
    """Cutting after expansion (tokenizer_model_max_length) equals the uncut run's prefix (causal)."""
    kw = dict(manager_type=manager_type, grid_type="all")
    ref_full = make_ref(hf_sdpa, settings(**kw), nonzero=True)
    (t,) = ref_full.image_token_counts([(384, 384)])
    ids, mask = pad_rows([[1, 2, 3] + [IMG] * t + [4, 5]])
    cut = 3 + 1000
    ref_cut = make_ref(hf_sdpa, settings(model_max_length=cut, **kw), nonzero=True)
    pix = pixels(1, 2)
    with torch.no_grad():
        full, _ = ref_full(ids, pix, [(384, 384)], attention_mask=mask)
        short, _ = ref_cut(ids, pix, [(384, 384)], attention_mask=mask)
    assert short.shape[1] == cut
    torch.testing.assert_close(short, full[:, :cut], rtol=1e-5, atol=1e-5)


def test_truncated_grid_offset_update_raises_like_the_original(hf_sdpa):
    ref = make_ref(hf_sdpa, settings(grid_type="grid", model_max_length=1200), nonzero=True)
    (t,) = ref.image_token_counts([(384, 384)])
    ids, mask = pad_rows([[1, 2, 3] + [IMG] * t + [4, 5]])
    with pytest.raises(ValueError, match="crashes"):
        ref(ids, pixels(1, 2), [(384, 384)], attention_mask=mask)


def test_jitter_multiplies_the_scores(hf_sdpa):
    st = settings(manager_type="adaptive_last_zerouni", image_aspect_ratio="square", merge_type="flat")
    params = init_manager_params(st, HIDDEN, seed=9, nonzero=True)
    ids, mask = pad_rows([chat_row([729])])
    pix = pixels(1, 1)
    static_noise = 1.0 + 0.01 * torch.rand(1, 2, 1, HIDDEN, generator=torch.Generator().manual_seed(0))
    scaled = dict(params)
    scaled["model.manager.0.layer_scores"] = params["model.manager.0.layer_scores"] * static_noise
    scaled["model.manager.1.zero_gate"] = params["model.manager.1.zero_gate"] * 1.5
    shapes = []

    def adaptive_noise(shape, row):
        shapes.append((shape, row))
        return torch.full(shape, 1.5)

    with torch.no_grad():
        jittered, _ = reference_from_hf_and_manager(hf_sdpa, params, st)(
            ids, pix, [(384, 384)], attention_mask=mask, jitter={0: static_noise, 1: adaptive_noise})
        expected, _ = reference_from_hf_and_manager(hf_sdpa, scaled, st)(ids, pix, [(384, 384)], attention_mask=mask)
        plain, _ = reference_from_hf_and_manager(hf_sdpa, params, st)(ids, pix, [(384, 384)], attention_mask=mask)
    assert shapes == [((1, 3, 729, HIDDEN), 0)]
    torch.testing.assert_close(jittered, expected, rtol=1e-5, atol=1e-5)
    assert float((jittered - plain).abs().max()) > 1e-4
