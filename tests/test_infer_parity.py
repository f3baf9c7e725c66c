"""Generation and scoring parity of the inference engine against PyTorch, on tiny fp32 models.

- Baseline (transformers LlavaOnevision, "hf" convention): our batched, left-padded, KV-cached
  greedy tokens equal transformers `generate` run prompt by prompt and as a left-padded batch.
- Manager models ("original" convention): our tokens equal a greedy loop that re-runs the full
  forward of the PyTorch Manager reference (`manager_jax.reference.torch_manager`) per token.
- Scores equal the log-likelihood computed from the reference's logits within 1e-4.

Our parameters come from the PyTorch state dicts through the converter's mapping table
(`tools.convert_weights.mapping`, driven by `reference.parity.tree_from_torch_state`). The random
models are "sharpened" (unit-variance embeddings, larger projections) so that greedy answers vary
from token to token instead of repeating one id.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from manager_jax.config import ImageConfig, ManagerConfig, ModelConfig
from manager_jax.infer.engine import InferenceEngine, Prompt, ScoreRequest
from manager_jax.infer.loading import model_from_params
from manager_jax.infer.sampling import SamplingParams
from manager_jax.pixels import normalize
from manager_jax.reference.hf_tiny import tiny_hf_config, tiny_hf_model
from manager_jax.reference.parity import random_image, tree_from_torch_state
from manager_jax.reference.torch_manager import ManagerSettings, init_manager_params, reference_from_hf_and_manager

IMG = 500  # image token id of the tiny config
IMS, IME, NL = 502, 503, 504  # stand-ins for <|im_start|>, <|im_end|>, "\n"
PAD = 0
NEW_TOKENS = 6


def sharpened_hf_model(attn: str = "sdpa"):
    hf = tiny_hf_model(tiny_hf_config(), seed=0, attn_implementation=attn)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith("embed_tokens.weight"):
                param.copy_(torch.randn(param.shape, generator=gen))
            elif "language_model" in name and name.endswith("proj.weight"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return hf


def params_from_torch(cfg: ModelConfig, state_dict: dict[str, torch.Tensor]) -> dict:
    """Our parameter tree from HF in-memory names (+ Manager tensors under their original names),
    through the converter's mapping table."""
    return tree_from_torch_state(cfg, {k: v.detach().numpy().copy() for k, v in state_dict.items()}, "hf_memory")


def chat(user: list[int]) -> list[int]:
    """A qwen_1_5-shaped prompt with small stand-in ids: system turn, user turn, assistant header."""
    return [IMS, 10, NL, 11, 12, IME, NL, IMS, 13, NL] + user + [IME, NL, IMS, 14, NL]


def prompts() -> list[Prompt]:
    """Different lengths and image counts: an anyres image, two pad-mode images, text only."""
    return [
        Prompt(chat([-200, NL, 20, 21, 22]), [random_image((120, 60), 1)]),
        Prompt(chat([-200, 15, -200, NL, 23, 24, 25, 26, 27, 28, 29]),
               [random_image((300, 300), 2), random_image((200, 400), 3)]),
        Prompt(chat([30, 31, 32]), []),
    ]


def torch_inputs(engine: InferenceEngine, prompt: Prompt) -> tuple[list[int], dict]:
    """HF-layout inputs: the image token repeated T times, pixels [n, crops, 3, 384, 384], sizes (H, W)."""
    sample = engine.process(prompt.ids, prompt.images, "x")
    ids, k = [], 0
    for token in prompt.ids:
        if token == -200:
            ids += [IMG] * sample.plans[k].num_tokens
            k += 1
        else:
            ids.append(int(token))
    if not prompt.images:
        return ids, {}
    offsets = np.cumsum([0] + [p.num_crops for p in sample.plans])
    pixels = np.zeros((len(sample.plans), max(p.num_crops for p in sample.plans), 3, 384, 384), np.float32)
    for i, plan in enumerate(sample.plans):
        pixels[i, : plan.num_crops] = normalize(sample.pixels[offsets[i] : offsets[i + 1]]).transpose(0, 3, 1, 2)
    sizes = [[im.size[1], im.size[0]] for im in prompt.images]
    return ids, {"pixel_values": torch.tensor(pixels), "image_sizes": torch.tensor(sizes),
                 "batch_num_images": torch.tensor([len(prompt.images)])}


# ---- baseline: transformers generate ---------------------------------------------------------


@pytest.fixture(scope="module")
def baseline():
    hf = sharpened_hf_model()
    cfg = ModelConfig.from_hf_config(hf.config.to_dict())
    engine = InferenceEngine(model_from_params(cfg, params_from_torch(cfg, hf.state_dict())), pad_id=PAD)
    return hf, engine


def hf_generate(hf, ids_rows: list[list[int]], extra: dict) -> list[list[int]]:
    width = max(len(r) for r in ids_rows)
    ids = torch.full((len(ids_rows), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(ids_rows):  # left padding, as generation needs
        ids[b, width - len(row):] = torch.tensor(row)
        mask[b, width - len(row):] = 1
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                          pad_token_id=PAD, eos_token_id=None, **extra)
    return out[:, width:].tolist()


def test_baseline_greedy_matches_transformers_generate(baseline):
    hf, engine = baseline
    batch = prompts()
    ours = [g.token_ids for g in engine.generate(batch, SamplingParams(max_new_tokens=NEW_TOKENS))]
    inputs = [torch_inputs(engine, p) for p in batch]
    one_by_one = [hf_generate(hf, [ids], extra)[0] for ids, extra in inputs]
    assert ours == one_by_one
    assert len({t for row in ours for t in row}) > 6  # answers that vary, so the comparison means something

    # transformers' own left-padded batch of the same prompts (image rows first, text-only last).
    pixels = [e["pixel_values"] for _, e in inputs if e]
    crops = max(p.shape[1] for p in pixels)
    stacked = torch.cat([torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, crops - p.shape[1])) for p in pixels])
    extra = {"pixel_values": stacked, "image_sizes": torch.cat([e["image_sizes"] for _, e in inputs if e]),
             "batch_num_images": torch.tensor([len(p.images) for p in batch])}
    assert hf_generate(hf, [ids for ids, _ in inputs], extra) == ours


# ---- Manager: the PyTorch reference ----------------------------------------------------------


def manager_setup(manager_type: str):
    hf = sharpened_hf_model()
    settings = ManagerSettings(manager_type=manager_type, select_layers=[1, 2, 3], injection_layers=[0, 2],
                               im_start_id=IMS, convention="original")
    manager_params = init_manager_params(settings, hf.config.text_config.hidden_size, seed=1, nonzero=True)
    reference = reference_from_hf_and_manager(hf, manager_params, settings)
    cfg = ModelConfig.from_hf_config(hf.config.to_dict()).replace(
        manager=ManagerConfig(type=manager_type, vision_select_layers_start=1, vision_select_layers_end=4,
                              injection_start=0, injection_interval=2, injection_end=4),
        image=ImageConfig(convention="original"),
    )
    state = dict(hf.state_dict(), **manager_params)
    engine = InferenceEngine(model_from_params(cfg, params_from_torch(cfg, state)), pad_id=PAD, im_start_id=IMS)
    _memoize_vision(reference)
    return reference, engine


@pytest.fixture(scope="module")
def static_manager():
    return manager_setup("static_zerouni")


def _memoize_vision(reference) -> None:
    """The greedy loop re-runs the reference's full forward per token; its vision part depends only on
    the pixels, so compute it once per pixel tensor (the decoder and the Manager still run fully)."""
    encode, memo = reference._encode, {}

    def cached(pixel_values, geoms):
        key = id(pixel_values)
        if key not in memo or memo[key][0] is not pixel_values:  # the entry keeps its tensor alive
            memo[key] = (pixel_values, encode(pixel_values, geoms))
        return memo[key][1]

    reference._encode = cached


def reference_greedy(reference, ids: list[int], extra: dict, steps: int) -> list[int]:
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits, _ = reference(torch.tensor([ids + out]), **extra)
            out.append(int(logits[0, -1].argmax()))
    return out


def check_manager_generation(reference, engine) -> None:
    batch = prompts()
    ours = [g.token_ids for g in engine.generate(batch, SamplingParams(max_new_tokens=NEW_TOKENS))]
    assert len({t for row in ours for t in row}) > 6
    for prompt, tokens in zip(batch, ours):
        ids, extra = torch_inputs(engine, prompt)
        extra = {k: (v.tolist() if k != "pixel_values" else v) for k, v in extra.items()}
        assert tokens == reference_greedy(reference, ids, extra, NEW_TOKENS)


def test_static_manager_greedy_matches_torch_reference(static_manager):
    check_manager_generation(*static_manager)


@pytest.mark.slow
@pytest.mark.parametrize("manager_type", [
    "adaptive_cross_zerouni",  # cross, last and average read the extra query (query_mask)
    "adaptive_zerouni",
    "adaptive_last_zerouni",
    "adaptive_average_zerouni",
])
def test_adaptive_manager_greedy_matches_torch_reference(manager_type):
    check_manager_generation(*manager_setup(manager_type))


def test_score_matches_torch_reference_loglikelihood(static_manager):
    reference, engine = static_manager
    # Continuations after the assistant header, one with images before them and one text-only.
    items = [prompts()[0], prompts()[2]]
    text_ids, _ = torch_inputs(engine, items[1])
    continuations = [[40, 41, 42, 43], reference_greedy(reference, text_ids, {}, 3)]  # arbitrary; greedy
    requests = [ScoreRequest(p.ids + c + [IME, NL], len(p.ids), len(p.ids) + len(c), p.images)
                for p, c in zip(items, continuations)]
    results = engine.score(requests)
    for prompt, cont, result in zip(items, continuations, results):
        ids, extra = torch_inputs(engine, Prompt(prompt.ids + cont + [IME, NL], prompt.images))
        extra = {k: (v.tolist() if k != "pixel_values" else v) for k, v in extra.items()}
        with torch.no_grad():
            logits, _ = reference(torch.tensor([ids]), **extra)
        logp = torch.log_softmax(logits[0].double(), dim=-1)
        start = len(ids) - len(cont) - 2  # expanded position of the first continuation token
        expected = sum(float(logp[start + i - 1, t]) for i, t in enumerate(cont))
        greedy = all(int(logits[0, start + i - 1].argmax()) == t for i, t in enumerate(cont))
        assert result.num_tokens == len(cont)
        assert abs(result.logprob - expected) < 1e-4
        assert result.is_greedy == greedy
    assert [r.is_greedy for r in results] == [False, True]
