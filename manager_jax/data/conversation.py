"""Conversation templates, tokenization with image placeholders, and training labels (SPEC §4, §7.2).

Conversations are LLaVA records' `conversations` lists: `[{"from": "human"|"gpt"|"system", "value": str}, ...]`
(`{"role": "user"|"assistant"|"system", "content": str}` is accepted too; the original's
`preprocess_qwen` reads those keys for every turn but the first, so it fails on such records).

Every returned id list uses `IMAGE_TOKEN_INDEX` (-200) where an image's features go; labels are
unshifted and `IGNORE_INDEX` (-100) where unsupervised.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

from manager_jax.data.tokenizer import IM_END, IM_START, QWEN2_TEXT_SPECIAL_TOKENS, Tokenizer

IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100
DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_SYSTEM_MESSAGE = "You are a helpful assistant."

_ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class ConversationError(ValueError):
    """A record whose conversation cannot be turned into a training sample.

    `reason` is short and machine readable (for skip counters); the message says what was wrong.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


def _turn_text(turn: Mapping[str, object], index: int) -> str:
    value = turn.get("value", turn.get("content")) if isinstance(turn, Mapping) else None
    if not isinstance(value, str):
        raise ConversationError("bad_turn", f"turn {index} needs a str 'value' (or 'content'), got {turn!r:.120}")
    return value


def _turn_role(turn: Mapping[str, object], index: int) -> str:
    raw = turn.get("from", turn.get("role")) if isinstance(turn, Mapping) else None
    role = _ROLE_ALIASES.get(raw) if isinstance(raw, str) else None
    if role is None:
        raise ConversationError("unknown_role", f"turn {index} has role {raw!r}; expected human/gpt/system")
    return role


def _value_key(turn: Mapping[str, object]) -> str:
    return "value" if "value" in turn else "content"


def count_images(conversations: Sequence[Mapping[str, object]]) -> int:
    """Number of "<image>" placeholders over all turns."""
    return sum(_turn_text(turn, i).count(DEFAULT_IMAGE_TOKEN) for i, turn in enumerate(conversations))


def normalize_image_placement(conversations: Sequence[Mapping[str, object]]) -> list[dict]:
    """`train.py preprocess_multimodal` for image records; returns new turns, the input is untouched.

    A turn holding exactly one "<image>" that is not at its start becomes "<image>\\n" + the rest
    stripped. Turns with several "<image>" are left alone. The original also deletes the marker
    "QA_GT_caption_based_noisy" from every turn (a data-cleaning leftover), reproduced here.
    """
    normalized = []
    for index, turn in enumerate(conversations):
        value = _turn_text(turn, index)
        if value.count(DEFAULT_IMAGE_TOKEN) == 1 and not value.startswith(DEFAULT_IMAGE_TOKEN):
            value = (DEFAULT_IMAGE_TOKEN + "\n" + value.replace(DEFAULT_IMAGE_TOKEN, "").strip()).strip()
        value = value.replace("QA_GT_caption_based_noisy", "")
        new_turn = copy.deepcopy(dict(turn))
        new_turn[_value_key(turn)] = value
        normalized.append(new_turn)
    return normalized


def tokenizer_image_token(prompt: str, tokenizer: Tokenizer) -> list[int]:
    """Ids of `prompt` with IMAGE_TOKEN_INDEX for each "<image>" (`mm_utils.tokenizer_image_token`).

    The text between placeholders is tokenized chunk by chunk, so no BPE merge crosses an image.
    Inside a chunk only Qwen2's own special tokens (<|endoftext|>, <|im_start|>, <|im_end|>) are
    special, as with the tokenizer the original was trained with. Qwen2 has no BOS to handle.
    """
    ids: list[int] = []
    for index, chunk in enumerate(prompt.split(DEFAULT_IMAGE_TOKEN)):
        if index > 0:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(tokenizer.encode(chunk, allow_special=QWEN2_TEXT_SPECIAL_TOKENS))
    return ids


def _mask_images(labels: list[int], ids: Sequence[int]) -> list[int]:
    # Image positions are replaced by image features (all unsupervised) when the sequence is
    # expanded, so their label value never reaches the loss; -100 keeps the labels clean.
    return [IGNORE_INDEX if i == IMAGE_TOKEN_INDEX else label for i, label in zip(ids, labels)]


def build_plain(conversations: Sequence[Mapping[str, object]], tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """Stage-1 "plain" template (`train.py preprocess_plain`): ids of "<image>" + caption + "\\n".

    The human instruction is dropped (replaced by a bare "<image>"); only the image is unlabelled.
    """
    if len(conversations) != 2:
        raise ConversationError("plain_needs_two_turns", f"got {len(conversations)} turns")
    if DEFAULT_IMAGE_TOKEN not in _turn_text(conversations[0], 0):
        raise ConversationError("plain_needs_image", "the first turn has no <image>")
    caption = _turn_text(conversations[1], 1)
    ids = tokenizer_image_token(DEFAULT_IMAGE_TOKEN + caption + "\n", tokenizer)
    prefix_len = len(tokenizer_image_token(DEFAULT_IMAGE_TOKEN, tokenizer))
    labels = [IGNORE_INDEX] * prefix_len + ids[prefix_len:]
    return ids, _mask_images(labels, ids)


def _chatml_turn(role: str, content: str) -> str:
    # The minimal chat template installed by preprocess_qwen: no implicit system turn.
    return f"{IM_START}{role}\n{content}{IM_END}\n"


def _validated_turns(conversations: Sequence[Mapping[str, object]]) -> list[tuple[str, str]]:
    """(role, text) pairs after dropping a leading assistant turn. As in `preprocess_qwen`, the
    roles need not alternate (two user turns in a row are two masked turns) and a system turn
    after the first is one more masked turn; at least one assistant turn must remain, else nothing
    but the chat's special ids would be supervised."""
    if len(conversations) == 0:
        raise ConversationError("empty_conversation", "no turns")
    turns = [(_turn_role(turn, i), _turn_text(turn, i)) for i, turn in enumerate(conversations)]
    if turns[0][0] == "system":
        # preprocess_qwen looks the first turn's role up among human/gpt only: a KeyError there.
        raise ConversationError("leading_system_turn", "the first turn is a system turn, which the original "
                                "cannot take (its system message is always the default one)")
    if turns[0][0] == "assistant":
        turns = turns[1:]
    if not turns:
        raise ConversationError("empty_conversation", "only one gpt turn, which is dropped")
    if all(role != "assistant" for role, _ in turns):
        raise ConversationError("no_assistant_turn", "nothing to supervise")
    return turns


def build_qwen_1_5(
    conversations: Sequence[Mapping[str, object]],
    tokenizer: Tokenizer,
    system: str = DEFAULT_SYSTEM_MESSAGE,
    *,
    has_image: bool = True,
) -> tuple[list[int], list[int]]:
    """qwen_1_5 training sample (`train.py preprocess_qwen`): (ids, labels), no truncation.

    ids = system turn + each turn rendered as "<|im_start|>{role}\\n{text}<|im_end|>\\n" (role user,
    assistant or system). Assistant turns are labelled in full (header and trailing "<|im_end|>\\n"
    included); system and user turns are not, except that every "\\n" (198), <|im_start|> and <|im_end|> id is
    labelled everywhere. A leading gpt turn is dropped. `has_image=False` (text-only records)
    tokenizes "<image>" as plain text, as the original does when it does not add the token.
    """
    turns = _validated_turns(conversations)

    def encode(text: str) -> list[int]:
        if has_image:
            return tokenizer_image_token(text, tokenizer)
        return tokenizer.encode(text, allow_special=QWEN2_TEXT_SPECIAL_TOKENS)

    ids = encode(_chatml_turn("system", system))
    labels = [IGNORE_INDEX] * len(ids)
    for role, text in turns:
        turn_ids = encode(_chatml_turn(role, text))
        ids += turn_ids
        labels += turn_ids if role == "assistant" else [IGNORE_INDEX] * len(turn_ids)

    newline_ids = tokenizer.encode("\n", allow_special=False)
    if len(newline_ids) != 1:
        raise ValueError(f"the tokenizer encodes '\\n' as {newline_ids}, not one id; it is not a Qwen2 tokenizer")
    # The original hard-codes 198 ("\n" in Qwen2) next to the two chat special ids.
    unmasked = {newline_ids[0], tokenizer.im_start_id, tokenizer.im_end_id}
    labels = [i if i in unmasked else label for i, label in zip(ids, labels)]
    return ids, _mask_images(labels, ids)


def _with_image_prefix(question: str, n_images: int) -> str:
    # lmms-eval adds one "<image>" per visual, space separated, when the task text has none.
    if n_images < 0:
        raise ValueError(f"n_images must be >= 0, got {n_images}")
    if n_images > 0 and DEFAULT_IMAGE_TOKEN not in question:
        return " ".join([DEFAULT_IMAGE_TOKEN] * n_images) + "\n" + question
    return question


def _chatml_prompt(system: str, question: str | Sequence[str], answer: str) -> str:
    # Conversation.get_prompt for SeparatorStyle.CHATML: an empty message renders only
    # "<role>\n" (no "<|im_end|>\n"), exactly as the original's `if message:` does.
    turns = [question] if isinstance(question, str) else list(question)
    if len(turns) % 2 != 1:
        raise ValueError(f"a conversation needs an odd number of turns (user first and last), got {len(turns)}")
    prompt = f"{IM_START}system\n{system}{IM_END}\n"
    roles = [f"{IM_START}user", f"{IM_START}assistant"]
    for index, message in enumerate(turns + [answer]):
        role = roles[index % 2]
        prompt += f"{role}\n{message}{IM_END}\n" if message else f"{role}\n"
    return prompt


def render_eval_prompt(question: str | Sequence[str], n_images: int, system: str = DEFAULT_SYSTEM_MESSAGE) -> str:
    """qwen_1_5 evaluation prompt text (`conv_qwen` CHATML + lmms-eval llava_onevision adapter).

    "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\n",
    where Q = " ".join(["<image>"] * n_images) + "\n" + question when images are given and the
    question has no "<image>", else the question. A sequence of strings is a conversation: turns
    alternately user and assistant (an odd number), then the open assistant turn; it gets no
    "<image>" prefix (the original parses a conversation only when it has none, lmms-eval's
    JSON-encoded contexts), so its turns must hold one "<image>" per image.
    """
    if isinstance(question, str):
        question = _with_image_prefix(question, n_images)
    return _chatml_prompt(system, question, "")


def build_eval_prompt(question: str | Sequence[str], n_images: int, tokenizer: Tokenizer) -> list[int]:
    """Ids of `render_eval_prompt(question, n_images)` with IMAGE_TOKEN_INDEX placeholders."""
    return tokenizer_image_token(render_eval_prompt(question, n_images), tokenizer)


def build_loglikelihood_pair(
    context: str, continuation: str, n_images: int, tokenizer: Tokenizer
) -> tuple[list[int], list[int]]:
    """lmms-eval `loglikelihood` steps 1-3: (ids of prompt + continuation turn, labels).

    The full text is the evaluation prompt with `continuation` as the assistant message
    ("...assistant\n{continuation}<|im_end|>\n"); labels are -100 over the first
    len(prompt ids) positions, since the original masks by length, not by content.
    """
    question = _with_image_prefix(context, n_images)
    prompt_len = len(tokenizer_image_token(_chatml_prompt(DEFAULT_SYSTEM_MESSAGE, question, ""), tokenizer))
    ids = tokenizer_image_token(_chatml_prompt(DEFAULT_SYSTEM_MESSAGE, question, continuation), tokenizer)
    labels = [IGNORE_INDEX] * min(prompt_len, len(ids)) + ids[prompt_len:]
    return ids, _mask_images(labels, ids)
