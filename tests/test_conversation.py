"""Tests for manager_jax.data.conversation.

Expected ids and labels are built independently: with transformers' Qwen2Tokenizer (built from
the same ranks in tests/test_tokenizer.py), its `apply_chat_template` with the minimal ChatML
template of `train.py preprocess_qwen`, "<image>" as an added special token replaced by -200
afterwards, and label masks from role boundaries, as the original does.
"""

from __future__ import annotations

import copy

import pytest

from manager_jax.data.conversation import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    ConversationError,
    build_eval_prompt,
    build_loglikelihood_pair,
    build_plain,
    build_qwen_1_5,
    count_images,
    normalize_image_placement,
    render_eval_prompt,
    tokenizer_image_token,
)
from manager_jax.data.tokenizer import load_tokenizer
from tests.test_tokenizer import build_reference_hf_qwen2

HF_IMAGE_ID = 151646
UNMASKED_IDS = {198, 151644, 151645}
SYSTEM = "You are a helpful assistant."


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def hf_ref():
    return build_reference_hf_qwen2()


def hf_ids_with_images(hf_ref, text: str) -> list[int]:
    """HF tokenization with "<image>" as a special token, then its id replaced by -200."""
    return [IMAGE_TOKEN_INDEX if i == HF_IMAGE_ID else i for i in hf_ref.encode(text, add_special_tokens=False)]


def reference_qwen_1_5(hf_ref, conversations, system=SYSTEM):
    """preprocess_qwen written against HF: apply_chat_template per message, labels from roles."""
    roles = {"human": "user", "gpt": "assistant"}
    if conversations[0]["from"] == "gpt":
        conversations = conversations[1:]
    ids = list(hf_ref.apply_chat_template([{"role": "system", "content": system}], tokenize=True, return_dict=False))
    segments = [("system", len(ids))]
    for turn in conversations:
        role = roles[turn["from"]]
        message = [{"role": role, "content": turn["value"]}]
        encoded = list(hf_ref.apply_chat_template(message, tokenize=True, return_dict=False))
        ids += encoded
        segments.append((role, len(encoded)))
    labels = []
    for role, length in segments:
        start = len(labels)
        labels += ids[start : start + length] if role == "assistant" else [IGNORE_INDEX] * length
    labels = [i if i in UNMASKED_IDS else label for i, label in zip(ids, labels)]
    # Image positions: -200 in ids; their labels are dropped by the image expansion (-100 here).
    labels = [IGNORE_INDEX if i == HF_IMAGE_ID else label for i, label in zip(ids, labels)]
    ids = [IMAGE_TOKEN_INDEX if i == HF_IMAGE_ID else i for i in ids]
    return ids, labels, segments


MULTI_TURN = [
    {"from": "human", "value": "<image>\nWhat is in the picture? Describe it.\nBe brief."},
    {"from": "gpt", "value": "A red bus.\nIt is parked."},
    {"from": "human", "value": "Какого цвета небо? 天空是什么颜色？"},
    {"from": "gpt", "value": "Blue 🙂\n\nMostly."},
    {"from": "human", "value": "Thanks!\n"},
    {"from": "gpt", "value": "You're welcome.<|endoftext|>"},
]


# ---------------------------------------------------------------- tokenizer_image_token


@pytest.mark.parametrize(
    "prompt",
    ["<image>\nDescribe this.", "a<image>b<image>", "x <image> y", "<image><image>", "no image at all", "",
     "<|im_start|>user\n<image> caption<|im_end|>\n"],
)
def test_tokenizer_image_token_matches_hf_special_token(tok, hf_ref, prompt):
    assert tokenizer_image_token(prompt, tok) == hf_ids_with_images(hf_ref, prompt)


def test_tokenizer_image_token_places_one_index_per_image(tok):
    ids = tokenizer_image_token("a<image>b<image>", tok)
    assert ids == tok.encode("a") + [IMAGE_TOKEN_INDEX] + tok.encode("b") + [IMAGE_TOKEN_INDEX]


def test_tokenizer_image_token_keeps_video_as_text(tok):
    # The original tokenizer only knows Qwen2's three specials; "<video>" is ordinary text there.
    ids = tokenizer_image_token("<video>", tok)
    assert 151647 not in ids and tok.decode(ids) == "<video>"


# ---------------------------------------------------------------- image placement


def test_normalize_moves_single_image_to_front():
    convs = [
        {"from": "human", "value": "  What is this? <image>  "},
        {"from": "gpt", "value": "A cat. QA_GT_caption_based_noisy"},
    ]
    original = copy.deepcopy(convs)
    out = normalize_image_placement(convs)
    assert out == [
        {"from": "human", "value": "<image>\nWhat is this?"},
        {"from": "gpt", "value": "A cat. "},
    ]
    assert convs == original  # input untouched


@pytest.mark.parametrize(
    "value",
    ["<image>\nAlready first", "<image> first without newline", "two <image> and <image>", "no image", ""],
)
def test_normalize_leaves_other_turns(value):
    assert normalize_image_placement([{"from": "human", "value": value}]) == [{"from": "human", "value": value}]


def test_normalize_image_in_middle_with_newlines():
    out = normalize_image_placement([{"role": "user", "content": "Look:\n<image>\nthen answer."}])
    assert out == [{"role": "user", "content": "<image>\nLook:\n\nthen answer."}]


def test_count_images():
    assert count_images(MULTI_TURN) == 1
    assert count_images([{"from": "human", "value": "<image> <image>\n<image>"}, {"from": "gpt", "value": "x"}]) == 3
    assert count_images([{"from": "human", "value": "none"}]) == 0


# ---------------------------------------------------------------- plain


def test_build_plain(tok, hf_ref):
    convs = [{"from": "human", "value": "<image>\nDescribe the image briefly."},
             {"from": "gpt", "value": "A dog runs on the beach.\nSunny day."}]
    ids, labels = build_plain(convs, tok)
    caption_ids = hf_ref.encode("A dog runs on the beach.\nSunny day.\n", add_special_tokens=False)
    assert ids == [IMAGE_TOKEN_INDEX] + caption_ids
    assert labels == [IGNORE_INDEX] + caption_ids


def test_build_plain_image_after_text(tok):
    ids, labels = build_plain([{"from": "human", "value": "Describe <image>"}, {"from": "gpt", "value": "x"}], tok)
    assert ids[0] == IMAGE_TOKEN_INDEX and labels[0] == IGNORE_INDEX and len(ids) == 1 + len(tok.encode("x\n"))


@pytest.mark.parametrize(
    "convs,reason",
    [
        ([{"from": "human", "value": "<image>"}], "plain_needs_two_turns"),
        ([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}],
         "plain_needs_two_turns"),
        ([{"from": "human", "value": "no image"}, {"from": "gpt", "value": "a"}], "plain_needs_image"),
        ([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": None}], "bad_turn"),
    ],
)
def test_build_plain_errors(tok, convs, reason):
    with pytest.raises(ConversationError) as info:
        build_plain(convs, tok)
    assert info.value.reason == reason
    assert isinstance(info.value, ValueError)


# ---------------------------------------------------------------- qwen_1_5


def test_qwen_1_5_matches_hf_chat_template(tok, hf_ref):
    ids, labels = build_qwen_1_5(MULTI_TURN, tok)
    expected_ids, expected_labels, _ = reference_qwen_1_5(hf_ref, MULTI_TURN)
    assert ids == expected_ids
    assert labels == expected_labels
    assert ids.count(IMAGE_TOKEN_INDEX) == 1


def test_qwen_1_5_label_mask_by_role(tok, hf_ref):
    ids, labels = build_qwen_1_5(MULTI_TURN, tok)
    _, _, segments = reference_qwen_1_5(hf_ref, MULTI_TURN)
    start = 0
    saw_merged_newline = False
    for role, length in segments:
        for i, label in zip(ids[start : start + length], labels[start : start + length]):
            if role == "assistant" or i in UNMASKED_IDS:
                assert label == (IGNORE_INDEX if i == IMAGE_TOKEN_INDEX else i)
            else:
                assert label == IGNORE_INDEX
                saw_merged_newline |= "\n" in tok.decode([i]) if i >= 0 else False
        start += length
    assert start == len(ids)
    # A token such as "?\n" or ".\n" inside a user turn stays masked (it is not id 198).
    assert saw_merged_newline


def test_qwen_1_5_unmasks_newline_and_chat_ids_in_user_turn(tok):
    ids, labels = build_qwen_1_5([{"from": "human", "value": "a\nb"}, {"from": "gpt", "value": "c"}], tok)
    rendered = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                "<|im_start|>user\na\nb<|im_end|>\n<|im_start|>assistant\nc<|im_end|>\n")
    assert tok.decode(ids) == rendered
    supervised = [tok.decode([label]) for label in labels if label != IGNORE_INDEX]
    # system: im_start, \n, im_end, \n; user: im_start, \n, \n (a\nb), im_end, \n; assistant: all 6.
    assert supervised == ["<|im_start|>", "\n", "<|im_end|>", "\n",
                          "<|im_start|>", "\n", "\n", "<|im_end|>", "\n",
                          "<|im_start|>", "assistant", "\n", "c", "<|im_end|>", "\n"]


def test_qwen_1_5_custom_system(tok, hf_ref):
    convs = MULTI_TURN[:2]
    ids, labels = build_qwen_1_5(convs, tok, system="Answer tersely.")
    assert (ids, labels) == reference_qwen_1_5(hf_ref, convs, system="Answer tersely.")[:2]


def test_qwen_1_5_drops_leading_gpt_turn(tok, hf_ref):
    convs = [{"from": "gpt", "value": "I speak first."}] + MULTI_TURN[:2]
    result = build_qwen_1_5(convs, tok)
    assert result == build_qwen_1_5(MULTI_TURN[:2], tok)
    assert result == reference_qwen_1_5(hf_ref, convs)[:2]
    assert "I speak first" not in tok.decode([i for i in result[0] if i >= 0])


def test_qwen_1_5_accepts_role_content_keys(tok):
    convs = [{"role": "user", "content": "<image>\nhi"}, {"role": "assistant", "content": "hello"}]
    legacy = [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "hello"}]
    assert build_qwen_1_5(convs, tok) == build_qwen_1_5(legacy, tok)


def test_qwen_1_5_trailing_user_turn_is_masked(tok, hf_ref):
    convs = MULTI_TURN[:3]
    ids, labels = build_qwen_1_5(convs, tok)
    expected_ids, expected_labels, segments = reference_qwen_1_5(hf_ref, convs)
    assert (ids, labels) == (expected_ids, expected_labels)
    tail = segments[-1][1]
    assert all(label == IGNORE_INDEX or label in UNMASKED_IDS for label in labels[-tail:])


@pytest.mark.parametrize("order", [("human", "human", "gpt"), ("human", "gpt", "gpt"), ("gpt", "gpt"),
                                   ("human", "gpt", "human", "human", "gpt")])
def test_qwen_1_5_roles_need_not_alternate(tok, hf_ref, order):
    # preprocess_qwen renders and labels each turn by its own role, in any order: such records train there.
    convs = [{"from": role, "value": f"<image>\nturn {i}" if i == 0 else f"turn {i}."} for i, role in enumerate(order)]
    assert build_qwen_1_5(convs, tok) == reference_qwen_1_5(hf_ref, convs)[:2]


def test_qwen_1_5_image_in_assistant_turn_is_unlabelled(tok):
    ids, labels = build_qwen_1_5([{"from": "human", "value": "draw"}, {"from": "gpt", "value": "<image> done"}], tok)
    position = ids.index(IMAGE_TOKEN_INDEX)
    assert labels[position] == IGNORE_INDEX
    assert labels[position + 1] == ids[position + 1]


def test_qwen_1_5_text_only_keeps_image_literal(tok, hf_ref):
    convs = [{"from": "human", "value": "What does <image> mean in LLaVA?"}, {"from": "gpt", "value": "A placeholder."}]
    ids, labels = build_qwen_1_5(convs, tok, has_image=False)
    assert IMAGE_TOKEN_INDEX not in ids and HF_IMAGE_ID not in ids
    assert "What does <image> mean" in tok.decode(ids)
    # Same as HF with a tokenizer that never had "<image>" added (split_special_tokens on the user text).
    user_ids = hf_ref.encode("What does <image> mean in LLaVA?", add_special_tokens=False, split_special_tokens=True)
    start = len(tok.encode(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"))
    assert ids[start : start + len(user_ids)] == user_ids


def test_qwen_1_5_system_turn_after_the_first_is_a_masked_turn(tok, hf_ref):
    convs = [MULTI_TURN[0], {"from": "system", "value": "Be brief.\nNo lists."}, MULTI_TURN[1]]
    ids, labels = build_qwen_1_5(convs, tok)
    system_ids = tok.encode("<|im_start|>system\nBe brief.\nNo lists.<|im_end|>\n")
    start = len(build_qwen_1_5(convs[:1] + [MULTI_TURN[1]], tok)[0]) - len(tok.encode("<|im_start|>assistant\n"
                                                                                      + MULTI_TURN[1]["value"] + "<|im_end|>\n"))
    assert ids[start : start + len(system_ids)] == system_ids
    assert labels[start : start + len(system_ids)] == [i if i in UNMASKED_IDS else IGNORE_INDEX for i in system_ids]


@pytest.mark.parametrize(
    "convs,reason",
    [
        ([], "empty_conversation"),
        ([{"from": "gpt", "value": "alone"}], "empty_conversation"),
        ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "no_assistant_turn"),
        ([{"from": "human", "value": "only a question"}], "no_assistant_turn"),
        ([{"from": "narrator", "value": "a"}, {"from": "gpt", "value": "b"}], "unknown_role"),
        ([{"from": "system", "value": "a"}, {"from": "human", "value": "b"}, {"from": "gpt", "value": "c"}],
         "leading_system_turn"),
        ([{"value": "a"}, {"from": "gpt", "value": "b"}], "unknown_role"),
        ([{"from": "human", "value": 3}, {"from": "gpt", "value": "b"}], "bad_turn"),
        (["not a dict", {"from": "gpt", "value": "b"}], "unknown_role"),
    ],
)
def test_qwen_1_5_errors(tok, convs, reason):
    with pytest.raises(ConversationError) as info:
        build_qwen_1_5(convs, tok)
    assert info.value.reason == reason


# ---------------------------------------------------------------- evaluation prompt


SPEC_PROMPT_HEAD = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
SPEC_PROMPT_TAIL = "<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(
    "question,n_images,q",
    [
        ("What is shown?", 1, "<image>\nWhat is shown?"),
        ("Compare them.", 3, "<image> <image> <image>\nCompare them."),
        ("Look at <image> and answer.", 2, "Look at <image> and answer."),
        ("Text only?", 0, "Text only?"),
    ],
)
def test_render_eval_prompt_is_spec_text(question, n_images, q):
    assert render_eval_prompt(question, n_images) == SPEC_PROMPT_HEAD + q + SPEC_PROMPT_TAIL


def test_build_eval_prompt_ids(tok, hf_ref):
    question = ("Which option is correct?\nA. cat\nB. dog\n"
                "Answer with the option's letter from the given choices directly.")
    ids = build_eval_prompt(question, 2, tok)
    text = SPEC_PROMPT_HEAD + "<image> <image>\n" + question + SPEC_PROMPT_TAIL
    assert ids == hf_ids_with_images(hf_ref, text)
    assert ids.count(IMAGE_TOKEN_INDEX) == 2
    assert ids[-3:] == [151644, 77091, 198]


def test_build_eval_prompt_rejects_negative_images(tok):
    with pytest.raises(ValueError, match="n_images"):
        build_eval_prompt("q", -1, tok)


def test_loglikelihood_pair(tok, hf_ref):
    ids, labels = build_loglikelihood_pair("Is it red?", "Yes, it is.", 1, tok)
    prompt_text = SPEC_PROMPT_HEAD + "<image>\nIs it red?" + SPEC_PROMPT_TAIL
    prompt_ids = hf_ids_with_images(hf_ref, prompt_text)
    assert ids == hf_ids_with_images(hf_ref, prompt_text + "Yes, it is.<|im_end|>\n")
    n = len(prompt_ids)
    assert ids[:n] == prompt_ids
    assert labels[:n] == [IGNORE_INDEX] * n
    assert labels[n:] == ids[n:] == hf_ref.encode("Yes, it is.<|im_end|>\n", add_special_tokens=False)


def test_loglikelihood_pair_masks_by_prompt_length(tok):
    # A continuation starting with "\n" merges with the prompt's last "\n" ("\n\n" is one token):
    # the original still masks the first len(prompt ids) positions.
    ids, labels = build_loglikelihood_pair("Q", "\nA", 0, tok)
    n = len(build_eval_prompt("Q", 0, tok))
    assert ids[n - 1] == tok.encode("\n\n")[0]
    assert labels[:n] == [IGNORE_INDEX] * n and labels[n:] == ids[n:]
    assert tok.decode(ids[n:]) == "A<|im_end|>\n"
