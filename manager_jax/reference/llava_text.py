"""The original's text path, transcribed for parity tests: no PyTorch, an HF tokenizer.

Written from LLaVA-OV-Manager (SPEC §4, §5, §7.2): `LLaVA-NeXT/llava/train/train.py`
(`preprocess_multimodal`, `preprocess_plain`, `preprocess_qwen`, `LazySupervisedDataset._get_item`,
`DataCollatorForSupervisedDataset`), `llava/mm_utils.py tokenizer_image_token`,
`llava/conversation.py conv_qwen`, `llava/model/llava_arch.py prepare_inputs_labels_for_multimodal`
and `lmms-eval/lmms_eval/models/llava_onevision.py`. It is deliberately literal (including what
the original gets wrong), so that `manager_jax.data.conversation` can be compared with it.

`tokenizer` is an HF tokenizer like Qwen2-Instruct's: `<|endoftext|>` (also the pad token),
`<|im_start|>` and `<|im_end|>` are special, "<image>" is not a token.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence

IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"
SYSTEM_MESSAGE = "You are a helpful assistant."
# preprocess_qwen resets the chat template to this one (no implicit system turn).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class OriginalFailure(Exception):
    """The original raises on this record; its `__getitem__` then retries and serves the next
    record instead, so the record itself never trains."""


def preprocess_multimodal(conversations: Sequence[Mapping]) -> list[dict]:
    """`preprocess_multimodal` (qwen versions, no im_start/end tokens) on a deep copy."""
    out = copy.deepcopy([dict(turn) for turn in conversations])
    for turn in out:
        if len(re.findall(IMAGE_TOKEN, turn["value"])) == 1 and not turn["value"].startswith(IMAGE_TOKEN):
            turn["value"] = (IMAGE_TOKEN + "\n" + turn["value"].replace(IMAGE_TOKEN, "").strip()).strip()
        turn["value"] = turn["value"].replace("QA_GT_caption_based_noisy", "")
    return out


def tokenizer_image_token(prompt: str, tokenizer) -> list[int]:
    """`mm_utils.tokenizer_image_token`: chunks around "<image>" tokenized apart, -200 between."""
    ids: list[int] = []
    for index, chunk in enumerate(prompt.split(IMAGE_TOKEN)):
        if index:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(tokenizer(chunk).input_ids)  # Qwen2 has no BOS, so nothing to strip
    return ids


def _with_image_token(tokenizer):
    # preprocess_qwen adds "<image>" as a special token to a deep copy when the record has an image.
    cached = getattr(tokenizer, "_reference_with_image", None)
    if cached is None:
        cached = copy.deepcopy(tokenizer)
        cached.add_tokens([IMAGE_TOKEN], special_tokens=True)
        tokenizer._reference_with_image = cached
    return cached


def _apply_template(tokenizer, messages: list[dict]) -> list[int]:
    # transformers 4.40 apply_chat_template(tokenize=True): render, then encode without specials added.
    rendered = tokenizer.apply_chat_template(messages, chat_template=CHAT_TEMPLATE, tokenize=False)
    return list(tokenizer.encode(rendered, add_special_tokens=False))


def preprocess_qwen(conversations: Sequence[Mapping], tokenizer, has_image: bool,
                    system_message: str = SYSTEM_MESSAGE) -> tuple[list[int], list[int]]:
    """`preprocess_qwen` for one record: (ids with -200, labels)."""
    roles = {"human": "user", "gpt": "assistant"}
    if has_image:
        tokenizer = _with_image_token(tokenizer)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) if has_image else None
    unmask = {198, tokenizer.convert_tokens_to_ids("<|im_start|>"), tokenizer.convert_tokens_to_ids("<|im_end|>")}
    source = list(conversations)
    first = source[0]["from"]
    if first not in roles:  # `roles[source[0]["from"]]` raises KeyError
        raise OriginalFailure(f"KeyError {first!r} on the first turn")
    if roles[first] != "user":
        source = source[1:]
    ids = _apply_template(tokenizer, [{"role": "system", "content": system_message}])
    labels = [IGNORE_INDEX] * len(ids)
    for turn in source:
        role = roles.get(turn["from"], turn["from"])
        encoded = _apply_template(tokenizer, [{"role": role, "content": turn["value"]}])
        ids += encoded
        labels += [IGNORE_INDEX] * len(encoded) if role in ("user", "system") else encoded
    for index, token in enumerate(ids):
        if token in unmask:
            labels[index] = token
        if token == image_id:
            ids[index] = IMAGE_TOKEN_INDEX
    return ids, labels


def preprocess_plain(conversations: Sequence[Mapping], tokenizer) -> tuple[list[int], list[int]]:
    """`preprocess_plain` (conv_llava_plain, sep "\\n")."""
    if len(conversations) != 2 or IMAGE_TOKEN not in conversations[0]["value"]:
        raise OriginalFailure("AssertionError in preprocess_plain")
    ids = tokenizer_image_token(IMAGE_TOKEN + conversations[1]["value"] + "\n", tokenizer)
    masked = len(tokenizer_image_token(IMAGE_TOKEN, tokenizer))
    return ids, [IGNORE_INDEX] * masked + ids[masked:]


def get_item(record: Mapping, tokenizer, template: str) -> tuple[list[int], list[int]]:
    """The text part of `_get_item` for an image or text record (no video)."""
    conversations = record["conversations"]
    if "image" in record:
        conversations = preprocess_multimodal(conversations)
    if template == "plain":
        return preprocess_plain(copy.deepcopy(list(conversations)), tokenizer)
    return preprocess_qwen(conversations, tokenizer, has_image="image" in record)


def collate_and_expand(ids: Sequence[int], labels: Sequence[int], image_lengths: Sequence[int],
                       max_length: int, pad_id: int) -> tuple[list[int], list[int]]:
    """What the decoder sees for one sample: the collator cuts to `max_length` and masks every
    pad id (`attention_mask = ids != pad`); `prepare_inputs_labels_for_multimodal` drops the
    masked positions, replaces each -200 by its image's positions (id None, label -100) and cuts
    to `max_length` again. A sample with no -200 left gets no image positions."""
    ids, labels = list(ids)[:max_length], list(labels)[:max_length]
    kept = [(i, label) for i, label in zip(ids, labels) if i != pad_id]
    out_ids: list[int | None] = []
    out_labels: list[int] = []
    images = iter(image_lengths)
    for token, label in kept:
        if token == IMAGE_TOKEN_INDEX:
            length = next(images)
            out_ids += [None] * length
            out_labels += [IGNORE_INDEX] * length
        else:
            out_ids.append(token)
            out_labels.append(label)
    return out_ids[:max_length], out_labels[:max_length]


def eval_prompt(context: str, n_images: int, continuation: str | None = None) -> str:
    """lmms-eval llava_onevision prompt with conv_qwen (CHATML): the question gets one "<image>"
    per visual when it has none; `continuation` None is the generation prompt."""
    question = context
    if n_images and IMAGE_TOKEN not in context:
        question = " ".join([IMAGE_TOKEN] * n_images) + "\n" + context
    text = "<|im_start|>system\n" + SYSTEM_MESSAGE + "<|im_end|>" + "\n"
    for role, message in (("<|im_start|>user", question), ("<|im_start|>assistant", continuation)):
        text += role + "\n" + message + "<|im_end|>" + "\n" if message else role + "\n"
    return text
