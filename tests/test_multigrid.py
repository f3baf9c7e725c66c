"""Tests for manager_jax.multigrid: geometry, unpad, bilinear taps and the token plan.

References: the SPEC formulas rewritten here independently, the SPEC §3.7 worked examples,
transformers' LlavaOnevision processor/model functions, and torch's F.interpolate.
"""

import math
import time
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.image_processing_utils import get_patch_output_size
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution
from transformers.image_utils import ChannelDimension
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel
from transformers.models.llava_onevision.modeling_llava_onevision import unpad_image as hf_unpad_image
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

from manager_jax import multigrid as mg

PINPOINTS = "(1x1),...,(6x6)"
G = 27
BASE = G * G


# ------------------------------------------------------------------------------------------
# Independent reimplementation of the SPEC formulas (no code shared with the module)
# ------------------------------------------------------------------------------------------


def spec_pairs():
    """The 36 pinpoints of SPEC §3.3, original order, as (w, h)."""
    return [(384 * i, 384 * j) for i in range(1, 7) for j in range(1, 7)]


def spec_best(W, H, cands):
    best, be, bw = None, 0, math.inf
    for w, h in cands:
        s = min(w / W, h / H)
        e = min(int(W * s) * int(H * s), W * H)
        waste = w * h - e
        if e > be or (e == be and waste < bw):
            best, be, bw = (w, h), e, waste
    return best


def spec_unpadded(W, H, rows, cols, convention):
    rnd = int if convention == "original" else (lambda x: int(round(x, 7)))
    if W / H > cols / rows:
        new_h = rnd(H * (cols / W))
        return rows - 2 * ((rows - new_h) // 2), cols
    new_w = rnd(W * (rows / H))
    return rows, cols - 2 * ((cols - new_w) // 2)


def spec_geometry(W, H, convention, max_n):
    cands = spec_pairs()
    if convention == "hf":  # transformers iterates the same list read as (h, w)
        cands = [(b, a) for a, b in cands]
    w_star, h_star = spec_best(W, H, cands)
    nw, nh = w_star // 384, h_star // 384
    h, w = spec_unpadded(W, H, G * nh, G * nw, convention)
    if max_n is not None:
        times = math.sqrt(h * w / (max_n * G * G))
        if times > 1.1:
            h, w = int(h // times), int(w // times)
    return (nw, nh), (h, w)


def spec_tokens(W, H, convention, max_n):
    _, (h, w) = spec_geometry(W, H, convention, max_n)
    return BASE + h * (w + 1)


def gather(plan, crop_features, newline_vec):
    """Apply a plan to crop features [num_crops, 729, D] the way the model will (gather+sum)."""
    flat = crop_features.reshape(-1, crop_features.shape[-1]).astype(np.float64)
    out = (plan.weight[..., None].astype(np.float64) * flat[plan.src]).sum(1)
    out[plan.newline] = newline_vec
    return out


def random_sizes(n, seed):
    rng = np.random.default_rng(seed)
    # log-uniform sides cover tiny, normal and huge images and extreme aspect ratios
    sides = np.exp(rng.uniform(0, math.log(4000), size=(n, 2))).astype(int).clip(1, 4000)
    extremes = [(1, 1), (1, 4000), (4000, 1), (4000, 3), (3, 4000), (4000, 4000), (2, 2), (384, 384), (385, 383)]
    return extremes + [tuple(int(v) for v in s) for s in sides]


# ------------------------------------------------------------------------------------------
# Pinpoints, best resolution, resize geometry
# ------------------------------------------------------------------------------------------


def test_parse_pinpoints_range_string_matches_hf_default_list():
    pairs = mg.parse_pinpoints(PINPOINTS)
    assert len(pairs) == 36
    assert pairs[:7] == [(384, 384), (384, 768), (384, 1152), (384, 1536), (384, 1920), (384, 2304), (768, 384)]
    assert pairs[-1] == (2304, 2304)
    # transformers ships the same expanded list (in its own (h, w) reading) as the class default
    assert pairs == [tuple(p) for p in LlavaOnevisionImageProcessorPil.image_grid_pinpoints]


def test_parse_pinpoints_other_forms_and_errors():
    assert mg.parse_pinpoints("(1x1),(2x3)", patch=336) == [(336, 336), (336, 672), (336, 1008), (672, 336), (672, 672), (672, 1008)]
    assert mg.parse_pinpoints("[[384, 768], (768, 384)]") == [(384, 768), (768, 384)]
    assert mg.parse_pinpoints([[768, 384], [384, 384]]) == [(768, 384), (384, 384)]
    for bad in ["", "[]", "[[384]]", "[[0, 384]]", "not a list", [(384, 384.0)], "(x)"]:
        with pytest.raises(ValueError):
            mg.parse_pinpoints(bad)


def test_select_best_resolution_tie_keeps_first_candidate():
    # A square 100x100 image fits both canvases fully with equal waste: the first one wins.
    assert mg.select_best_resolution((100, 100), [(768, 384), (384, 768)]) == (768, 384)
    assert mg.select_best_resolution((100, 100), [(384, 768), (768, 384)]) == (384, 768)
    # Effective resolution beats waste.
    assert mg.select_best_resolution((1000, 500), [(384, 384), (768, 768)]) == (768, 768)
    # Equal effective resolution: less waste wins.
    assert mg.select_best_resolution((1000, 500), [(1152, 384), (768, 384)]) == (768, 384)


def test_select_best_resolution_matches_transformers():
    cands = spec_pairs()
    for W, H in random_sizes(300, seed=1):
        ours = mg.select_best_resolution((W, H), cands)
        # transformers takes (H, W) and (h, w) pairs and returns (h, w)
        hf_h, hf_w = hf_select_best_resolution((H, W), [(h, w) for w, h in cands])
        assert ours == (hf_w, hf_h), (W, H)
        assert mg.best_resolution((W, H), PINPOINTS) == spec_best(W, H, cands)


def test_pinpoint_reading_order_follows_convention():
    # A tie between a pair and its transpose: the original reads (w, h), transformers (h, w).
    from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape

    pinpoints = [[768, 384], [384, 768]]
    orig = mg.plan_image((100, 100), mode="anyres_max_9", pinpoints=pinpoints)
    hf = mg.plan_image((100, 100), mode="anyres_max_9", pinpoints=pinpoints, convention="hf")
    assert orig.grid == (2, 1)
    nh, nw = get_anyres_image_grid_shape((100, 100), pinpoints, 384)  # transformers returns (rows, cols)
    assert hf.grid == (nw, nh) == (1, 2)


def test_best_resolution_max_tiles_filters_candidates():
    assert mg.best_resolution((1920, 1080), PINPOINTS) == (1920, 1152)
    w, h = mg.best_resolution((1920, 1080), PINPOINTS, max_tiles=4)
    assert (w // 384) * (h // 384) <= 4
    assert (w, h) == spec_best(1920, 1080, [(a, b) for a, b in spec_pairs() if (a // 384) * (b // 384) <= 4])
    with pytest.raises(ValueError):
        mg.best_resolution((10, 10), [(768, 768)], max_tiles=1)


def test_resize_geometry_matches_spec_and_transformers():
    assert mg.resize_geometry((1920, 1080), (1920, 1152)) == (1920, 1080, 0, 36)
    assert mg.resize_geometry((100, 300), (768, 768)) == (256, 768, 256, 0)
    for W, H in random_sizes(200, seed=2):
        target = mg.best_resolution((W, H), PINPOINTS)
        new_w, new_h, px, py = mg.resize_geometry((W, H), target)
        hf_h, hf_w = get_patch_output_size(np.zeros((1, H, W)), target[::-1], ChannelDimension.FIRST)
        assert (new_w, new_h) == (hf_w, hf_h)
        assert (px, py) == ((target[0] - new_w) // 2, (target[1] - new_h) // 2)
        assert 1 <= new_w <= target[0] and 1 <= new_h <= target[1]


# ------------------------------------------------------------------------------------------
# Unpad and bilinear
# ------------------------------------------------------------------------------------------


def test_unpad_conventions_differ_on_the_spec_example():
    # 1647x1281 -> grid 5x4 (SPEC §3.9 #1): 1281 * (135 / 1647) = 104.999...; int() gives 104
    # (2 rows of padding cut on each side), round(., 7) gives 105 (1 row each side).
    assert mg.unpadded_size((1647, 1281), (108, 135), "original") == (104, 135)
    assert mg.unpadded_size((1647, 1281), (108, 135), "hf") == (106, 135)


def test_unpad_hf_matches_transformers_unpad_image():
    for W, H in random_sizes(300, seed=3):
        nw, nh = (v // 384 for v in mg.best_resolution((W, H), PINPOINTS))
        rows, cols = G * nh, G * nw
        feat = torch.arange(rows * cols, dtype=torch.float64).reshape(1, rows, cols)
        ref = hf_unpad_image(feat, (H, W))[0].numpy()
        r0, r1, c0, c1 = mg.unpad_bounds((W, H), (rows, cols), "hf")
        np.testing.assert_array_equal(feat[0].numpy()[r0:r1, c0:c1], ref)
        assert mg.unpadded_size((W, H), (rows, cols), "original") == spec_unpadded(W, H, rows, cols, "original")


@pytest.mark.parametrize("size", [(800, 600), (1200, 500)])
def test_unpad_odd_remainder_keeps_an_extra_line(size):
    W, H = size
    nw, nh = (v // 384 for v in mg.best_resolution(size, PINPOINTS))
    rows, cols = G * nh, G * nw
    if W / H > cols / rows:
        exact = int(H * cols / W)
        assert (rows - exact) % 2 == 1  # the case under test
        assert mg.unpadded_size(size, (rows, cols)) == (exact + 1, cols)
    else:
        exact = int(W * rows / H)
        assert (cols - exact) % 2 == 1
        assert mg.unpadded_size(size, (rows, cols)) == (rows, exact + 1)


@pytest.mark.parametrize("in_size,out_size", [(135, 108), (75, 60), (162, 100), (7, 3), (5, 5), (3, 7), (1, 4), (88, 87)])
def test_bilinear_taps_match_torch_interpolate(in_size, out_size):
    x = np.random.default_rng(0).standard_normal((3, in_size)).astype(np.float32)
    i0, i1, w0, w1 = mg.bilinear_taps(in_size, out_size)
    ours = w0 * x[:, i0] + w1 * x[:, i1]
    ref = F.interpolate(torch.from_numpy(x)[None, :, None, :], size=(1, out_size), mode="bilinear")[0, :, 0].numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    # the weights themselves equal torch's (probe interpolate with one-hot rows) to float32 rounding
    probe = F.interpolate(torch.eye(in_size)[None, :, None, :], size=(1, out_size), mode="bilinear")[0, :, 0].numpy()
    dense = np.zeros((in_size, out_size), np.float64)
    np.add.at(dense, (i0, np.arange(out_size)), w0)
    np.add.at(dense, (i1, np.arange(out_size)), w1)
    np.testing.assert_allclose(dense, probe, atol=1e-7)
    assert np.all((i0 >= 0) & (i1 < in_size) & (i1 - i0 <= 1))
    np.testing.assert_allclose(w0 + w1, 1, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Token plan
# ------------------------------------------------------------------------------------------

WORKED_EXAMPLES = [
    # (W, H), best (w, h), (nw, nh), final (h', w'), tokens   -- SPEC §3.7 table
    ((384, 384), (384, 384), (1, 1), (27, 27), 1485),
    ((640, 480), (768, 768), (2, 2), (40, 54), 2929),
    ((1024, 899), (1152, 1152), (3, 3), (71, 81), 6551),
    ((1920, 1080), (1920, 1152), (5, 3), (60, 108), 7269),
    ((4000, 1000), (2304, 768), (6, 2), (40, 162), 7249),
]


@pytest.mark.parametrize("size,best,grid,final,tokens", WORKED_EXAMPLES)
@pytest.mark.parametrize("convention", ["original", "hf"])
def test_spec_worked_examples(size, best, grid, final, tokens, convention):
    plan = mg.plan_image(size, mode="anyres_max_9", pinpoints=PINPOINTS, convention=convention)
    assert plan.canvas == best
    assert plan.grid == grid
    assert plan.grid_map == final
    assert plan.num_tokens == tokens
    assert plan.num_crops == 1 + grid[0] * grid[1]


def test_spec_rounding_example_1647x1281():
    assert mg.plan_image((1647, 1281), mode="anyres_max_9", pinpoints=PINPOINTS).num_tokens == 7332
    assert mg.plan_image((1647, 1281), mode="anyres_max_9", pinpoints=PINPOINTS, convention="hf").num_tokens == 7261


def test_single_crop_modes():
    for mode in ("square", "pad"):
        orig = mg.plan_image((640, 480), mode=mode)
        assert (orig.num_tokens, orig.num_crops, orig.grid) == (729, 1, None)
        assert orig.is_base.all() and not orig.newline.any()
        np.testing.assert_array_equal(orig.src[:, 0], np.arange(729))
        hf = mg.plan_image((640, 480), mode=mode, convention="hf")
        assert hf.num_tokens == 730 and hf.newline[-1] and hf.newline.sum() == 1
        assert not hf.is_base[-1] and hf.is_base[:729].all()


def test_anyres_downsampling_follows_convention():
    # 1920x1080 has times 1.24: plain anyres only downsamples under transformers' rules.
    orig = mg.plan_image((1920, 1080), mode="anyres", pinpoints=PINPOINTS)
    assert orig.grid_map == (75, 135) and orig.num_tokens == 729 + 75 * 136
    assert (orig.weight[~orig.newline] == np.array([1, 0, 0, 0], np.float32)).all()
    hf = mg.plan_image((1920, 1080), mode="anyres", pinpoints=PINPOINTS, convention="hf")
    assert hf.grid_map == (60, 108) and hf.num_tokens == 7269
    # a larger N lets the map through unchanged
    assert mg.plan_image((1920, 1080), mode="anyres_max_16", pinpoints=PINPOINTS).grid_map == (75, 135)


def _check_invariants(plan, W, H, convention, max_n):
    T = plan.num_tokens
    assert plan.src.shape == (T, 4) and plan.src.dtype == np.int32
    assert plan.weight.shape == (T, 4) and plan.weight.dtype == np.float32
    assert plan.newline.shape == plan.is_base.shape == (T,)
    assert T == spec_tokens(W, H, convention, max_n)
    grid, (h, w) = spec_geometry(W, H, convention, max_n)
    assert plan.grid == grid and plan.grid_map == (h, w)
    feat = ~plan.newline
    assert plan.src.min() >= 0 and plan.src.max() < plan.num_crops * BASE
    np.testing.assert_allclose(plan.weight[feat].sum(1), 1, atol=1e-6)
    assert (plan.weight >= 0).all() and not plan.weight[plan.newline].any()
    # base first, then the grid; every grid row ends with (exactly one) newline
    assert plan.is_base[:BASE].all() and not plan.is_base[BASE:].any()
    assert not plan.newline[:BASE].any()
    expected_nl = BASE + np.arange(h) * (w + 1) + w
    np.testing.assert_array_equal(np.flatnonzero(plan.newline), expected_nl)
    # grid tokens only read grid crops
    assert (plan.src[BASE:][feat[BASE:]] >= BASE).all()


@pytest.mark.parametrize("convention", ["original", "hf"])
def test_random_size_sweep_invariants(convention):
    for W, H in random_sizes(2000, seed=4 if convention == "original" else 5):
        plan = mg.plan_image((W, H), mode="anyres_max_9", pinpoints=PINPOINTS, convention=convention)
        _check_invariants(plan, W, H, convention, 9)
    for W, H in random_sizes(100, seed=6):
        plan = mg.plan_image((W, H), mode="anyres", pinpoints=PINPOINTS, convention=convention)
        _check_invariants(plan, W, H, convention, None if convention == "original" else 9)


def test_plan_of_a_6x6_grid_is_fast():
    mg.plan_image((2304, 2304), mode="anyres", pinpoints=PINPOINTS)
    start = time.perf_counter()
    for _ in range(10):
        plan = mg.plan_image((2304, 2304), mode="anyres", pinpoints=PINPOINTS)
    assert plan.num_tokens == 729 + 162 * 163
    assert (time.perf_counter() - start) / 10 < 0.05


def test_plan_errors():
    with pytest.raises(ValueError, match="mode"):
        mg.plan_image((10, 10), mode="highres", pinpoints=PINPOINTS)
    with pytest.raises(ValueError, match="mode"):
        mg.plan_image((10, 10), mode="anyres_max_x", pinpoints=PINPOINTS)
    with pytest.raises(ValueError, match="convention"):
        mg.plan_image((10, 10), mode="pad", convention="torch")
    with pytest.raises(ValueError, match="pinpoints"):
        mg.plan_image((10, 10), mode="anyres_max_9")
    with pytest.raises(ValueError, match="positive"):
        mg.plan_image((0, 10), mode="square")
    with pytest.raises(ValueError, match="grid_type 'grid' with mm_patch_merge_type 'flat'"):
        mg.plan_image((10, 10), mode="anyres_max_9", pinpoints=PINPOINTS, unpad=False, grid_type="grid")
    assert mg.plan_image((10, 10), mode="square", unpad=False).num_tokens == 729


def test_flat_anyres_plan_is_every_crop_in_order():
    """mm_patch_merge_type "flat" (llava_arch.py's flat branch): each crop's 729 tokens in crop
    order, no unpad, no newline; the Manager covers every token for "main" as for "all"."""
    unpadded = mg.plan_image((700, 330), mode="anyres_max_9", pinpoints=PINPOINTS)
    plan = mg.plan_image((700, 330), mode="anyres_max_9", pinpoints=PINPOINTS, unpad=False, grid_type="main")
    assert (plan.num_crops, plan.grid, plan.canvas) == (unpadded.num_crops, unpadded.grid, unpadded.canvas)
    assert plan.num_tokens == plan.num_crops * 729 and not plan.newline.any() and plan.is_base.sum() == 729
    np.testing.assert_array_equal(plan.src[:, 0], np.arange(plan.num_tokens))
    assert plan.manager.all()


# ------------------------------------------------------------------------------------------
# Against transformers
# ------------------------------------------------------------------------------------------


class _ProcessorWithoutVideo(LlavaOnevisionProcessor):
    """transformers' processor; its class check for the (absent, torchvision-only) video
    processor is skipped so it can be built offline without torchvision."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


@pytest.fixture(scope="module")
def hf_processor():
    vocab = {"<unk>": 0, "<image>": 1, "<video>": 2, "hello": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<image>", "<video>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    image_processor = LlavaOnevisionImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return _ProcessorWithoutVideo(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=None,
        num_image_tokens=BASE,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )


def test_token_counts_match_transformers_processor(hf_processor):
    sizes = random_sizes(200, seed=7) + [(1647, 1281), (1281, 1647)]
    hf_counts = hf_processor._get_num_multimodal_tokens(image_sizes=[(H, W) for W, H in sizes]).num_image_tokens
    ours = [mg.plan_image(s, mode="anyres_max_9", pinpoints=PINPOINTS, convention="hf").num_tokens for s in sizes]
    assert ours == hf_counts


def pinpoint_edge_sizes():
    """Every pinpoint's exact size and aspect ratio (at half size), and each just off by one pixel."""
    sizes = []
    for w, h in spec_pairs():
        sizes += [(w, h), (w + 1, h), (w - 1, h), (w, h + 1), (w // 2, h // 2), (w // 2, h // 2 + 1), (w // 2 + 1, h // 2)]
    return sizes + [(1, 1), (1, 2000), (2000, 1), (383, 385), (385, 383), (4000, 300), (300, 4000), (5000, 5000)]


def test_token_counts_at_pinpoint_edges_match_both_references(hf_processor):
    sizes = pinpoint_edge_sizes()
    hf_counts = hf_processor._get_num_multimodal_tokens(image_sizes=[(H, W) for W, H in sizes]).num_image_tokens
    for (W, H), hf_count in zip(sizes, hf_counts):
        assert mg.plan_image((W, H), mode="anyres_max_9", pinpoints=PINPOINTS, convention="hf").num_tokens == hf_count
        original = mg.plan_image((W, H), mode="anyres_max_9", pinpoints=PINPOINTS, convention="original")
        assert original.num_tokens == spec_tokens(W, H, "original", 9), (W, H)


def test_token_counts_match_transformers_processor_end_to_end(hf_processor):
    from PIL import Image

    for W, H in [(640, 480), (50, 700)]:
        out = hf_processor(images=[Image.new("RGB", (W, H))], text=["hello <image>"], return_tensors="np")
        plan = mg.plan_image((W, H), mode="anyres_max_9", pinpoints=PINPOINTS, convention="hf")
        assert int((out["input_ids"] == 1).sum()) == plan.num_tokens
        assert out["pixel_values"].shape[1] == plan.num_crops
    # multi-image samples: transformers pads each image to a square, one crop, 729 + 1 tokens
    images = [[Image.new("RGB", (640, 480)), Image.new("RGB", (300, 480))]]
    out = hf_processor(images=images, text=["hello <image> <image>"], return_tensors="np")
    assert int((out["input_ids"] == 1).sum()) == 2 * mg.plan_image((640, 480), mode="pad", convention="hf").num_tokens


HF_FEATURE_SIZES = [(1920, 1080), (1647, 1281), (640, 480), (4000, 1000), (1, 4000), (4000, 3), (384, 384), (2304, 2304), (1200, 500)]


@pytest.mark.parametrize("size", HF_FEATURE_SIZES)
def test_features_match_transformers_pack_image_features(size):
    W, H = size
    plan = mg.plan_image(size, mode="anyres_max_9", pinpoints=PINPOINTS, convention="hf")
    rng = np.random.default_rng(8)
    dim = 6
    feats = rng.standard_normal((plan.num_crops, BASE, dim)).astype(np.float32)
    newline = rng.standard_normal(dim).astype(np.float32)
    # pack_image_features only reads self.config, so a config namespace stands in for the model.
    fake_model = types.SimpleNamespace(
        config=types.SimpleNamespace(
            vision_config=types.SimpleNamespace(image_size=384, patch_size=14),
            image_grid_pinpoints=[list(p) for p in mg.parse_pinpoints(PINPOINTS)],
        )
    )
    packed, lens = LlavaOnevisionModel.pack_image_features(
        fake_model, [torch.from_numpy(feats)], torch.tensor([[H, W]]), torch.from_numpy(newline), "anyres_max_9"
    )
    ref = packed[0].numpy()
    assert ref.shape[0] == plan.num_tokens == int(lens[0])
    np.testing.assert_allclose(gather(plan, feats, newline), ref, atol=1e-5)


def test_single_crop_features_match_transformers_newline():
    rng = np.random.default_rng(9)
    feats = rng.standard_normal((1, BASE, 4)).astype(np.float32)
    newline = rng.standard_normal(4).astype(np.float32)
    fake_model = types.SimpleNamespace(
        config=types.SimpleNamespace(vision_config=types.SimpleNamespace(image_size=384, patch_size=14), image_grid_pinpoints=[])
    )
    packed, _ = LlavaOnevisionModel.pack_image_features(
        fake_model, [torch.from_numpy(feats)], torch.tensor([[480, 640]]), torch.from_numpy(newline)
    )
    plan = mg.plan_image((640, 480), mode="pad", convention="hf")
    np.testing.assert_allclose(gather(plan, feats, newline), packed[0].numpy(), atol=1e-6)


# ------------------------------------------------------------------------------------------
# Against an independent torch implementation of the original (SPEC §3.6-§3.7)
# ------------------------------------------------------------------------------------------


def original_pack(feats, W, H, max_n, newline):
    """LLaVA-OV-Manager's spatial_unpad path, written from SPEC §3.6-§3.7 with torch ops."""
    base, tiles = feats[0], feats[1:]
    w_star, h_star = spec_best(W, H, spec_pairs())
    nw, nh = w_star // 384, h_star // 384
    dim = feats.shape[-1]
    x = tiles.view(nh, nw, G, G, dim).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
    rows, cols = x.shape[1:]
    if W / H > cols / rows:
        pad = (rows - int(H * (cols / W))) // 2
        x = x[:, pad : rows - pad, :]
    else:
        pad = (cols - int(W * (rows / H))) // 2
        x = x[:, :, pad : cols - pad]
    _, h, w = x.shape
    if max_n is not None:
        times = math.sqrt(h * w / (max_n * G * G))
        if times > 1.1:
            x = F.interpolate(x[None], [int(h // times), int(w // times)], mode="bilinear")[0]
    x = torch.cat([x, newline[:, None, None].expand(dim, x.shape[1], 1)], dim=-1)
    return torch.cat([base, x.flatten(1, 2).transpose(0, 1)], dim=0)


@pytest.mark.parametrize("size", [(1920, 1080), (1647, 1281), (800, 600), (1200, 500), (1024, 899), (3000, 3000), (333, 2900)])
@pytest.mark.parametrize("mode,max_n", [("anyres_max_9", 9), ("anyres", None)])
def test_features_match_independent_original_implementation(size, mode, max_n):
    W, H = size
    plan = mg.plan_image(size, mode=mode, pinpoints=PINPOINTS, convention="original")
    rng = np.random.default_rng(10)
    feats = rng.standard_normal((plan.num_crops, BASE, 5)).astype(np.float32)
    newline = rng.standard_normal(5).astype(np.float32)
    ref = original_pack(torch.from_numpy(feats), W, H, max_n, torch.from_numpy(newline)).numpy()
    assert ref.shape[0] == plan.num_tokens
    np.testing.assert_allclose(gather(plan, feats, newline), ref, atol=1e-5)


# ------------------------------------------------------------------------------------------
# Manager token mask (SPEC §2.4, §2.6)
# ------------------------------------------------------------------------------------------


def test_manager_mask_multi_crop():
    plan = mg.plan_image((1920, 1080), mode="anyres_max_9", pinpoints=PINPOINTS)
    T = plan.num_tokens
    # the original injects F[:, :, :L] at [start + offset, start + offset + L)
    expected = {"all": (0, T), "main": (0, BASE), "grid": (BASE, T)}  # offset 729 only for "grid"
    for grid_type, (lo, hi) in expected.items():
        mask = mg.manager_token_mask(plan, grid_type)
        np.testing.assert_array_equal(np.flatnonzero(mask), np.arange(lo, hi))
    # newline tokens of the grid are part of the "grid" manager features
    assert mg.manager_token_mask(plan, "grid")[plan.newline].all()


@pytest.mark.parametrize("convention", ["original", "hf"])
def test_manager_mask_single_crop(convention):
    plan = mg.plan_image((640, 480), mode="pad", convention=convention)
    for grid_type in ("main", "all"):
        np.testing.assert_array_equal(np.flatnonzero(mg.manager_token_mask(plan, grid_type)), np.arange(BASE))
    assert not mg.manager_token_mask(plan, "grid").any()  # the original would write into the text


def test_manager_mask_through_plan_and_errors():
    plan = mg.plan_image((640, 480), mode="anyres_max_9", pinpoints=PINPOINTS, grid_type="main")
    np.testing.assert_array_equal(plan.manager, plan.is_base)
    assert mg.plan_image((640, 480), mode="anyres_max_9", pinpoints=PINPOINTS).manager is None
    with pytest.raises(ValueError, match="grid_type"):
        mg.manager_token_mask(plan, "base")
