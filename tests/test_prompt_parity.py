"""Prompt building and label masking, token for token against the original's text path.

The reference is `manager_jax.reference.llava_text` (the original's preprocess_multimodal /
preprocess_qwen / preprocess_plain / collator / image expansion, and the lmms-eval prompt),
run on transformers' Qwen2Tokenizer built from the Qwen2 ranks with Qwen2-Instruct's specials
(tests/test_tokenizer.py). Ours is `process_record` + `expand_sample` for training and
`build_eval_prompt` / `build_loglikelihood_pair` for evaluation. Conversations are generated at
random from pieces that stress the template: "\\n" and merged ".\\n", literal chat tokens,
"<image>" anywhere, non-ASCII, empty turns, system turns, a leading gpt turn.
"""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image

from manager_jax.batch import expand_sample
from manager_jax.data.conversation import build_eval_prompt, build_loglikelihood_pair
from manager_jax.data.samples import SampleOptions, SkipSample, process_record
from manager_jax.data.tokenizer import load_tokenizer
from manager_jax.reference import llava_text as ref
from tests.test_tokenizer import build_reference_hf_qwen2

PAD_ID = 151643
N_CASES = 400

PIECES = [
    "Hello", " world", "What is in the image?", "It is a cat.", ".\n", "\n", "\n\n", " \n", "A.\nB.",
    "<image>", "<image>\n", " <image> ", "<|im_start|>", "<|im_end|>", "<|im_start|>assistant\n", "<|endoftext|>", "<video>",
    "日本語のテキスト", " Ünïcödé", "e\u0301", "🙂", "  ", "123", "'s", "QA_GT_caption_based_noisy", "<image", "image>",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def hf():
    return build_reference_hf_qwen2(instruct=True)


@pytest.fixture(scope="module")
def png():
    buf = io.BytesIO()
    Image.new("RGB", (20, 10), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.choice([0, 1, 2, 3, 5, 8])))


def random_record(rng: random.Random, png: bytes, index: int) -> dict:
    n_turns = rng.choice([1, 2, 2, 3, 4, 4, 5, 6])
    roles = []
    for t in range(n_turns):
        role = "human" if t % 2 == 0 else "gpt"
        if rng.random() < 0.1:
            role = "system"
        elif rng.random() < 0.1:
            role = "gpt" if role == "human" else "human"
        roles.append(role)
    turns = [{"from": role, "value": random_text(rng)} for role in roles]
    record = {"id": str(index), "conversations": turns}
    kind = rng.random()
    if kind < 0.6:  # images, usually with matching placeholders
        n_images = rng.choice([1, 1, 1, 2, 3])
        placeholders = turns[0]["value"].count("<image>")
        if rng.random() < 0.8 and placeholders != n_images:
            for turn in turns:
                turn["value"] = turn["value"].replace("<image>", "")
            for _ in range(n_images):
                turn = turns[0] if rng.random() < 0.7 else rng.choice(turns)
                cut = rng.randint(0, len(turn["value"]))
                turn["value"] = turn["value"][:cut] + rng.choice(["<image>", "<image>\n", "<image> "]) + turn["value"][cut:]
        record["image"] = [f"im{k}.png" for k in range(n_images)]
        record["image_bytes"] = [png] * n_images
    return record


def ours_expanded(sample, max_length: int | None):
    exp = expand_sample(sample.ids, sample.labels, [p.num_tokens for p in sample.plans], max_length)
    ids: list[int | None] = [int(i) for i in exp.ids]
    for start, length in zip(exp.image_starts, exp.image_lengths):
        ids[start : start + length] = [None] * len(ids[start : start + length])
    return ids[: exp.length], [int(x) for x in exp.labels]


def documented_departure(record: dict, template: str, reason: str) -> bool:
    """Records the original trains on that we skip on purpose (README "Data"): no assistant turn
    left (only the chat's special ids would be supervised); images not matched one to one by
    "<image>" (other than one image and no "<image>"), where the original reuses an image or
    hands the images of the other samples of its batch to the wrong sample; a plain-template
    record without exactly one image or with "<image>" in its caption (the original inserts the
    dummy image of text-only samples, or reuses the one image)."""
    turns = record["conversations"][1:] if record["conversations"][0]["from"] == "gpt" else record["conversations"]
    placeholders = sum(t["value"].count("<image>") for t in turns)
    n_images = len(record.get("image", []))
    if template == "plain":
        return n_images != 1 or "<image>" in record["conversations"][-1]["value"]
    if reason in ("no_assistant_turn", "empty_conversation"):
        return all(t["from"] != "gpt" for t in turns)
    if reason == "image_count_mismatch":
        return "image" in record and placeholders != n_images and not (n_images == 1 and placeholders == 0)
    return False


@pytest.mark.parametrize("template", ["qwen_1_5", "plain"])
def test_training_ids_and_labels_match_the_original(tok, hf, png, template):
    rng = random.Random(1234 if template == "qwen_1_5" else 99)
    compared = 0
    for index in range(N_CASES):
        record = random_record(rng, png, index)
        max_length = rng.choice([None, None, 40, 800])
        options = SampleOptions(template=template, image_mode="pad", unpad=False, seq_len=max_length, truncate=True)
        where = f"record {record}, max_length {max_length}"
        try:
            ref_ids, ref_labels = ref.get_item(record, hf, template)
        except ref.OriginalFailure:
            ref_ids = None
        try:
            sample = process_record(record, tok, options, with_pixels=False)
        except SkipSample as skip:
            assert ref_ids is None or documented_departure(record, template, skip.reason), f"{where}: we skip ({skip}), the original trains"
            continue
        assert ref_ids is not None, f"{where}: the original fails on it, we train"
        lengths = [p.num_tokens for p in sample.plans]
        want = ref.collate_and_expand(ref_ids, ref_labels, lengths, max_length or 10**9, PAD_ID)
        assert ours_expanded(sample, max_length) == want, where
        compared += 1
    # The generator must exercise the comparison, not only skips (few records fit plain's 2 turns).
    assert compared > (N_CASES // 4 if template == "qwen_1_5" else 20)


def test_generated_cases_cover_the_hard_ones(png):
    rng = random.Random(1234)
    records = [random_record(rng, png, i) for i in range(N_CASES)]
    values = [t["value"] for r in records for t in r["conversations"]]
    assert any(r["conversations"][0]["from"] == "gpt" for r in records)
    assert any(t["from"] == "system" for r in records for t in r["conversations"][1:])
    assert any(t["from"] == "gpt" and "<image>" in t["value"] for r in records for t in r["conversations"])
    assert any(v.count("<image>") > 1 for v in values) and any(v == "" for v in values)
    assert any("<image>" in v and "<image>\n" not in v for v in values)
    assert any("image" in r and "<image>" not in str(r["conversations"]) for r in records)
    assert any("image" not in r and "<image>" in str(r["conversations"]) for r in records)


@pytest.mark.parametrize("seed", range(3))
def test_eval_prompts_match_the_lmms_eval_adapter(tok, hf, seed):
    rng = random.Random(seed)
    for _ in range(100):
        context, answer = random_text(rng), random_text(rng).replace("<image>", "")
        n_images = rng.choice([0, 1, 2, 3])
        prompt = ref.tokenizer_image_token(ref.eval_prompt(context, n_images), hf)
        assert build_eval_prompt(context, n_images, tok) == prompt, (context, n_images)
        ids, labels = build_loglikelihood_pair(context, answer, n_images, tok)
        full = ref.tokenizer_image_token(ref.eval_prompt(context, n_images, answer), hf)
        assert ids == full, (context, answer)
        # The original's labels: -100 over the prompt's length, the full ids after it.
        want = [ref.IGNORE_INDEX] * min(len(prompt), len(full)) + full[len(prompt):]
        assert [lab for lab, i in zip(labels, ids) if i != ref.IMAGE_TOKEN_INDEX] == \
            [lab for lab, i in zip(want, full) if i != ref.IMAGE_TOKEN_INDEX]
