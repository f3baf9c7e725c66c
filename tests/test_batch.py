"""Batch assembly: every field against hand computations; the extra-query rule on hand-built ids."""

import functools

import ml_dtypes
import numpy as np
import pytest

from manager_jax import multigrid
from manager_jax.batch import (
    Batch,
    BatchShapeError,
    ProcessedSample,
    expand_sample,
    query_positions,
)
from manager_jax.batch import assemble_batch as _assemble_batch
from manager_jax.pixels import normalize

IMG = -200
IGN = -100
S_ = 151644  # <|im_start|>
E_ = 151645  # <|im_end|>
NL = 198
CROP = 2  # tiny crops keep the tests fast; assembly does not care about the crop size
assemble_batch = functools.partial(_assemble_batch, crop_size=CROP)


def tiny_plan(t: int, crops: int = 1, newline_last: bool = False) -> multigrid.ImagePlan:
    src = np.stack([np.arange(t), np.arange(t) + 1, np.arange(t) + 2, np.arange(t) + 3], axis=1).astype(np.int32)
    weight = np.tile(np.array([[0.4, 0.3, 0.2, 0.1]], np.float32), (t, 1))
    newline = np.zeros(t, bool)
    if newline_last:
        newline[-1] = True
    if crops == 1:  # single-crop images: every feature token comes from the base crop
        is_base = ~newline
    else:
        is_base = np.zeros(t, bool)
        is_base[: max(1, t // 2)] = True
    return multigrid.ImagePlan(crops, None, src, weight, newline, is_base)


def sample(sid, ids, labels, plans=(), fill=1):
    crops = sum(p.num_crops for p in plans)
    pixels = np.full((crops, CROP, CROP, 3), fill, np.uint8)
    return ProcessedSample(id=sid, ids=np.array(ids), labels=np.array(labels), pixels=pixels, plans=list(plans))


def test_expand_sample_by_hand():
    exp = expand_sample(np.array([10, IMG, 11, IMG]), np.array([IGN, IGN, 11, IGN]), [3, 2])
    assert exp.full_length == 1 + 3 + 1 + 2
    assert exp.ids.tolist() == [10, 0, 0, 0, 11, 0, 0]
    assert exp.labels.tolist() == [IGN, IGN, IGN, IGN, 11, IGN, IGN]
    assert exp.image_starts.tolist() == [1, 5]
    cut = expand_sample(np.array([10, IMG, 11, IMG]), np.array([IGN, IGN, 11, IGN]), [3, 2], max_len=4)
    assert cut.length == 4 and cut.full_length == 7 and cut.ids.tolist() == [10, 0, 0, 0]


def test_assemble_unpacked_every_field():
    pa, pc1, pc2 = tiny_plan(3), tiny_plan(2, crops=2, newline_last=True), tiny_plan(1)
    a = sample("a", [10, IMG, 11, 12], [IGN, IGN, 11, 12], [pa], fill=1)
    b = sample("b", [20, 21], [20, 21])
    c = sample("c", [IMG, 30, IMG, 31], [IGN, 30, IGN, 31], [pc1, pc2], fill=2)
    batch = assemble_batch(
        [a, b, c], rows=3, seq_len=8, max_crops=6, max_image_tokens=8, pack=False,
        grid_type="main", query_type=None, pad_id=7,
    )
    P = 7
    assert batch.input_ids.tolist() == [
        [10, 0, 0, 0, 11, 12, P, P],
        [20, 21, P, P, P, P, P, P],
        [0, 0, 30, 0, 31, P, P, P],
    ]
    assert batch.labels.tolist() == [
        [IGN, IGN, IGN, IGN, 11, 12, IGN, IGN],
        [20, 21] + [IGN] * 6,
        [IGN, IGN, 30, IGN, 31, IGN, IGN, IGN],
    ]
    assert batch.positions.tolist() == [[0, 1, 2, 3, 4, 5, 0, 0], [0, 1, 0, 0, 0, 0, 0, 0], [0, 1, 2, 3, 4, 0, 0, 0]]
    assert batch.segment_ids.tolist() == [[1] * 6 + [0] * 2, [1] * 2 + [0] * 6, [1] * 5 + [0] * 3]
    # Crops: a's 1 crop, then c's 2 + 1; the rest zero.
    assert batch.crop_mask.tolist() == [True, True, True, True, False, False]
    assert batch.pixel_values.shape == (6, CROP, CROP, 3)
    assert np.all(batch.pixel_values[0] == 1) and np.all(batch.pixel_values[1:4] == 2)
    assert np.all(batch.pixel_values[4:] == 0)
    # Plan: a's 3 tokens, c's 2 (crop offset 1), c's 1 (crop offset 3), 2 padding tokens.
    expected_src = np.concatenate([pa.src, pc1.src + 1 * 729, pc2.src + 3 * 729, np.zeros((2, 4), np.int32)])
    assert np.array_equal(batch.plan_src, expected_src)
    assert np.array_equal(batch.plan_weight[:6], np.tile([[0.4, 0.3, 0.2, 0.1]], (6, 1)).astype(np.float32))
    assert np.all(batch.plan_weight[6:] == 0)
    assert batch.plan_dst.tolist() == [1, 2, 3, 16, 17, 19, 24, 24]
    assert batch.plan_image.tolist() == [0, 0, 0, 1, 1, 2, -1, -1]
    assert batch.plan_newline.tolist() == [False, False, False, False, True, False, False, False]
    # grid_type "main" on a multi-crop image = its base tokens; single-crop images: feature tokens.
    assert batch.plan_manager.tolist() == [True, True, True, True, False, True, False, False]
    assert not batch.query_mask.any()
    assert batch.sample_ids == [["a"], ["b"], ["c"]]
    assert batch.shape == {"rows": 3, "seq_len": 8, "crops": 6, "image_tokens": 8}


def test_truncation_after_expansion_drops_image_tokens_past_the_cut():
    a = sample("a", [10, IMG, 11, 12], [IGN, IGN, 11, 12], [tiny_plan(3)])
    batch = assemble_batch([a], rows=1, seq_len=3, max_crops=1, max_image_tokens=4, pack=False, grid_type=None, query_type=None)
    assert batch.input_ids.tolist() == [[10, 0, 0]]
    assert batch.labels.tolist() == [[IGN, IGN, IGN]]
    assert batch.segment_ids.tolist() == [[1, 1, 1]]
    # The third image token would land at position 3 >= S: dropped (dst = B*S = 3).
    assert batch.plan_dst.tolist() == [1, 2, 3, 3]
    assert batch.plan_image.tolist() == [0, 0, 0, -1]
    assert not batch.plan_manager.any()  # no Manager
    with pytest.raises(BatchShapeError, match="seq_len"):
        assemble_batch([a], rows=1, seq_len=3, max_crops=1, max_image_tokens=4, pack=False, truncate=False,
                       grid_type=None, query_type=None)


def test_packed_rows_segments_positions_and_destinations():
    a = sample("a", [1, IMG, 2], [IGN, IGN, 2], [tiny_plan(2)])  # 4 tokens
    b = sample("b", [3, 4, 5, 6, 7], [3, 4, 5, 6, 7])  # 5 tokens
    c = sample("c", [IMG, 8], [IGN, 8], [tiny_plan(1)])  # 2 tokens
    batch = assemble_batch([a, b, c], rows=2, seq_len=6, max_crops=3, max_image_tokens=4, pack=True,
                           grid_type="all", query_type=None)
    # First fit: a -> row 0 (4/6), b -> row 1 (5/6), c -> row 0 (6/6).
    assert batch.sample_ids == [["a", "c"], ["b"]]
    assert batch.segment_ids.tolist() == [[1, 1, 1, 1, 2, 2], [1, 1, 1, 1, 1, 0]]
    assert batch.positions.tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 4, 0]]
    assert batch.input_ids.tolist() == [[1, 0, 0, 2, 0, 8], [3, 4, 5, 6, 7, 0]]
    assert batch.labels.tolist() == [[IGN, IGN, IGN, 2, IGN, 8], [3, 4, 5, 6, 7, IGN]]
    # a's image at row 0 pos 1-2; c's image at row 0 pos 4 (crop 1 -> src offset 729).
    assert batch.plan_dst.tolist() == [1, 2, 4, 12]
    assert batch.plan_src[2].tolist() == (tiny_plan(1).src[0] + 729).tolist()
    assert batch.plan_image.tolist() == [0, 0, 1, -1]
    assert batch.plan_manager.tolist() == [True, True, True, False]


def test_plan_manager_follows_grid_type_on_a_real_anyres_plan():
    plan = multigrid.plan_image((640, 480), mode="anyres_max_9", pinpoints="(1x1),...,(6x6)")
    assert plan.num_crops == 5 and plan.num_tokens == 2929  # SPEC §3.7 worked example
    s = sample("x", [5, IMG, 6], [IGN, IGN, 6], [plan])
    kw = dict(rows=1, seq_len=3000, max_crops=5, max_image_tokens=3000, pack=False, query_type=None)
    main = assemble_batch([s], grid_type="main", **kw).plan_manager
    grid = assemble_batch([s], grid_type="grid", **kw).plan_manager
    every = assemble_batch([s], grid_type="all", **kw).plan_manager
    assert main[:729].all() and not main[729:].any()
    assert not grid[:729].any() and grid[729:2929].all() and not grid[2929:].any()
    assert every[:2929].all() and not every[2929:].any()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rows=1, max_crops=4, max_image_tokens=8), "samples for 1 rows"),
        (dict(rows=3, max_crops=3, max_image_tokens=8), "max_crops"),
        (dict(rows=3, max_crops=4, max_image_tokens=5), "max_image_tokens"),
    ],
)
def test_shapes_that_do_not_fit_raise(kwargs, message):
    a = sample("a", [IMG, 1], [IGN, 1], [tiny_plan(3)])
    c = sample("c", [IMG, 2], [IGN, 2], [tiny_plan(3, crops=3)])
    with pytest.raises(BatchShapeError, match=message):
        assemble_batch([a, c], seq_len=8, pack=False, grid_type=None, query_type=None, **kwargs)


def test_packed_mode_refuses_to_cut_a_sample():
    long = sample("long", list(range(1, 10)), list(range(1, 10)))
    with pytest.raises(BatchShapeError, match="never cuts"):
        assemble_batch([long], rows=2, seq_len=8, max_crops=1, max_image_tokens=1, pack=True, grid_type=None, query_type=None)


def test_to_model_inputs_is_a_dict_of_numpy_arrays():
    a = sample("a", [1, IMG, 2], [IGN, IGN, 2], [tiny_plan(2)])
    batch = assemble_batch([a], rows=2, seq_len=6, max_crops=2, max_image_tokens=3, pack=True,
                           grid_type="all", query_type="last")
    inputs = batch.to_model_inputs()
    assert set(inputs) == set(Batch.ARRAY_FIELDS)
    dtypes = {k: v.dtype for k, v in inputs.items()}
    assert dtypes["input_ids"] == np.int32 and dtypes["pixel_values"] == np.float32
    assert dtypes["crop_mask"] == bool and dtypes["plan_dst"] == np.int32 and dtypes["query_mask"] == bool
    # The model gets the normalised crops (in the dtype asked for); other processes the uint8 ones.
    np.testing.assert_array_equal(inputs["pixel_values"], normalize(batch.pixel_values))
    assert inputs["pixel_values"][0, 0, 0, 0] == normalize(np.uint8([1]))[0]
    assert batch.to_model_inputs(ml_dtypes.bfloat16)["pixel_values"].dtype == ml_dtypes.bfloat16
    as_dict = batch.to_dict()
    assert as_dict["pixel_values"].dtype == np.uint8
    again = Batch.from_dict(as_dict)
    for k in Batch.ARRAY_FIELDS:
        assert np.array_equal(getattr(again, k), getattr(batch, k))
    for k, v in again.to_model_inputs().items():
        assert np.array_equal(v, inputs[k])


# --------------------------------------------------------------------------------------------
# The extra-query rule (SPEC §2.5, §2.7), on hand-built Qwen chat / plain sequences.
# --------------------------------------------------------------------------------------------

SYSTEM = [S_, 9, NL, 1, 2, E_, NL]  # "<|im_start|>system\n..<|im_end|>\n": 7 ids, positions 0-6


def test_query_chat_image_first():
    # user turn: <|im_start|>(7) user(8) \n(9) <image>(10) \n(11) q1(12) q2(13) <|im_end|>(14) \n(15)
    ids = SYSTEM + [S_, 872, NL, IMG, NL, 501, 502, E_, NL, S_, 77, NL, 600, E_, NL]
    # Image of 4 tokens at 10..13; "\n" 14; question 15, 16; <|im_end|> 17.
    assert query_positions(np.array(ids), [4]).tolist() == [15, 16]


def test_query_chat_text_before_image():
    # <|im_start|>(7) user(8) \n(9) q1(10) q2(11) \n(12) <image>(13) <|im_end|>(14) \n(15) <|im_start|>(16)
    ids = SYSTEM + [S_, 872, NL, 501, 502, NL, IMG, E_, NL, S_, 77, NL, 600, E_, NL]
    # range(q0+3, s) = [10, 11, 12] minus its last ("\n"); nothing after the image.
    assert query_positions(np.array(ids), [4]).tolist() == [10, 11]


def test_query_chat_without_third_im_start_uses_the_sequence_end():
    ids = SYSTEM + [S_, 872, NL, IMG, NL, 501, 502, E_, NL]  # 16 ids, no assistant turn
    # q1 = 16 - 2 + 4 = 18 -> [q2+1, q1-1) = [15, 17)
    assert query_positions(np.array(ids), [4]).tolist() == [15, 16]


def test_query_plain_caption_minus_final_token_and_truncation():
    ids = [IMG, 31, 32, 33, NL]  # image (4 tokens) at 0..3, caption 4..6, "\n" at 7
    assert query_positions(np.array(ids), [4]).tolist() == [4, 5, 6]
    assert query_positions(np.array(ids), [4], max_len=6).tolist() == [4, 5]


def test_query_plain_starts_at_the_manager_feature_length():
    ids = [IMG, 31, 32, 33, NL]  # an image of 10 tokens (0..9) whose Manager features are 4 ("main")
    # modeling_qwen2.py: range(q2, min(q1 - 1, S)) with q2 = image_length_list[-1] = 4, q1 = 14
    assert query_positions(np.array(ids), [10], manager_lengths=[4]).tolist() == list(range(4, 13))


def test_query_multi_image_matches_the_original_729_formula():
    # user: <|im_start|>(7) user(8) \n(9) <image>(10) " "(11) <image>(12) \n(13) q1 q2 <|im_end|> \n <|im_start|>(18)
    ids = np.array(SYSTEM + [S_, 872, NL, IMG, 220, IMG, NL, 501, 502, E_, NL, S_, 77, NL])
    n, idx, p3 = 2, [10, 12], 18
    # modeling_qwen2.py: start = image_index[-1] + 729 + 1 with image_index = idx_k - k + k*729;
    # end = q1 + 729*(n-1) - n with q1 = p3 - 2 + 729.
    start = (idx[-1] - (n - 1) + (n - 1) * 729) + 729 + 1
    end = (p3 - 2 + 729) + 729 * (n - 1) - n
    assert query_positions(ids, [729, 729]).tolist() == list(range(start, end))
    assert end - start == 2  # the two question tokens


def test_query_text_only_is_empty():
    assert query_positions(np.array(SYSTEM + [S_, 872, NL, 5, E_, NL]), []).size == 0


def test_query_mask_in_a_packed_batch_is_offset_by_the_segment_start():
    first = sample("t", [40, 41], [40, 41])
    chat = SYSTEM + [S_, 872, NL, IMG, NL, 501, 502, E_, NL, S_, 77, NL, 600, E_, NL]
    labels = [IGN] * len(chat)
    second = sample("c", chat, labels, [tiny_plan(4)])
    kw = dict(rows=1, seq_len=40, max_crops=1, max_image_tokens=4, pack=True, grid_type="all")
    batch = assemble_batch([first, second], query_type="average", **kw)
    assert np.flatnonzero(batch.query_mask[0]).tolist() == [2 + 15, 2 + 16]
    assert not assemble_batch([first, second], query_type="none", **kw).query_mask.any()
    assert not assemble_batch([first, second], query_type=None, **kw).query_mask.any()
