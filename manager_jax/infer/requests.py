"""Text + images -> engine requests, in the qwen_1_5 evaluation format (SPEC §4, §7.2).

Shared by the CLI (`run.py generate|score`) and the lmms-eval adapter, so both build prompts the
same way: the question wrapped in the system / user / assistant template, one "<image>" per image
prepended when the text has none, -200 sentinels where the image features go.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from manager_jax.data.conversation import DEFAULT_IMAGE_TOKEN, build_eval_prompt, build_loglikelihood_pair
from manager_jax.data.tokenizer import IM_END, QWEN2_TEXT_SPECIAL_TOKENS
from manager_jax.infer.engine import InputError, Prompt, ScoreRequest


def generation_prompt(question: str | Sequence[str], images: Sequence[Image.Image], tokenizer) -> Prompt:
    """The evaluation prompt of `question` (or a conversation's turns, `render_eval_prompt`) with
    `images`, ready for `InferenceEngine.generate`."""
    return Prompt(build_eval_prompt(question, len(images), tokenizer), list(images))


def score_request(context: str, continuation: str, images: Sequence[Image.Image], tokenizer) -> ScoreRequest | None:
    """The request scoring `continuation` as the assistant's answer to `context` (None if it is empty).

    The ids are those of the original lmms-eval adapter (the full conversation with the
    continuation as the assistant message, "...assistant\\n{continuation}<|im_end|>\\n").
    Scored are the continuation's own tokens: not the prompt, and not the template's closing
    "<|im_end|>\\n" (which the original's mean loss includes, SPEC §7.2). If the joint tokenization
    merges across the prompt/continuation boundary (a continuation starting with "\\n"), the
    continuation is tokenized on its own and appended instead, so the prompt stays intact.
    """
    if continuation == "":
        return None
    if DEFAULT_IMAGE_TOKEN in continuation:
        raise InputError(f"the continuation must not contain {DEFAULT_IMAGE_TOKEN!r}: images go with the prompt "
                         "(and are never scored)")
    n_images = len(images)
    prompt_ids = build_eval_prompt(context, n_images, tokenizer)
    full_ids, _ = build_loglikelihood_pair(context, continuation, n_images, tokenizer)
    suffix = tokenizer.encode(IM_END + "\n", allow_special=QWEN2_TEXT_SPECIAL_TOKENS)
    aligned = (full_ids[: len(prompt_ids)] == prompt_ids and full_ids[-len(suffix):] == suffix
               and len(full_ids) > len(prompt_ids) + len(suffix))
    if not aligned:
        full_ids = prompt_ids + tokenizer.encode(continuation, allow_special=QWEN2_TEXT_SPECIAL_TOKENS) + suffix
    return ScoreRequest(full_ids, len(prompt_ids), len(full_ids) - len(suffix), list(images))
