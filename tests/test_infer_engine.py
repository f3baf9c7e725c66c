"""The inference engine on our own tiny random models: cached decoding against full forwards,
left padding, stopping, sampling knobs, sharding and input errors.

Expected values come from the model's full (uncached) forward over the whole sequence, recomputed
here per step, or from the rules being tested (buckets, padding layout), never from the engine.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp

import numpy as np
import pytest
from flax import nnx

from manager_jax.config import tiny
from manager_jax.data.conversation import IMAGE_TOKEN_INDEX
from manager_jax.infer.engine import (
    InferenceEngine,
    InputError,
    Prompt,
    PromptTooLongError,
    ScoreRequest,
    count_bucket,
    length_bucket,
    rows_bucket,
)
from manager_jax.infer.sampling import SamplingParams
from manager_jax.models.llava_ov import LlavaOV
from manager_jax.pixels import normalize
from manager_jax.reference.parity import random_image

NEW = 6


def tiny_model(variant: str, vocab: int | None = None, head_dim: int | None = None, qkv_biases: bool = False) -> LlavaOV:
    """A random tiny model whose greedy answers vary: unit-variance embeddings and large decoder
    projections (with small ones every answer repeats its last input token); non-zero Manager
    scores; `qkv_biases`: non-zero q/k/v biases too (which the fused decode kernels add)."""
    cfg = tiny(variant, image_token_id=500)
    if vocab is not None:
        cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=vocab))
    if head_dim is not None:
        cfg = cfg.replace(text=dataclasses.replace(cfg.text, head_dim=head_dim))
    model = LlavaOV(cfg, rngs=nnx.Rngs(3))
    keys = iter(jax.random.split(jax.random.key(4), 16))
    model.text.embed.embedding[...] = jax.random.normal(next(keys), model.text.embed.embedding.shape)
    layers = model.text.layers
    for linear in (layers.attn.q, layers.attn.k, layers.attn.v, layers.attn.o, layers.mlp.gate, layers.mlp.up,
                   layers.mlp.down):
        linear.kernel[...] = 0.3 * jax.random.normal(next(keys), linear.kernel.shape)
    for linear in (layers.attn.q, layers.attn.k, layers.attn.v) if qkv_biases else ():
        linear.bias[...] = 0.5 * jax.random.normal(next(keys), linear.bias.shape)
    if variant.endswith("manager"):
        for block in model.manager.blocks:
            block.layer_scores[...] = 0.5 * jax.random.normal(next(keys), block.layer_scores.shape)
    return model


@pytest.fixture(scope="module")
def manager_engine():
    model = tiny_model("manager")  # square images (729 tokens, no newline) + a static Manager
    return model, InferenceEngine(model, pad_id=0)


@pytest.fixture(scope="module")
def baseline_engine():
    model = tiny_model("baseline")
    return model, InferenceEngine(model, pad_id=0)


def mixed_prompts() -> list[Prompt]:
    return [Prompt([1, 2, 3, IMAGE_TOKEN_INDEX, 4, 5], [random_image((90, 60), 7)]),
            Prompt([6, 7, 8, 9, 10, 11, 12, 13])]


def expanded_ids(engine: InferenceEngine, prompt: Prompt) -> tuple[np.ndarray, list[int]]:
    """The prompt's ids with each image expanded to its T slots (id 0), and the image slot indices."""
    sample = engine.process(prompt.ids, prompt.images, "p")
    ids, slots, k = [], [], 0
    for token in prompt.ids:
        if token == IMAGE_TOKEN_INDEX:
            slots += list(range(len(ids), len(ids) + sample.plans[k].num_tokens))
            ids += [0] * sample.plans[k].num_tokens
            k += 1
        else:
            ids.append(token)
    return np.asarray(ids, np.int32), slots


FULL_LENGTH = 768  # the uncached reference forward runs at one padded length: one compilation


@nnx.jit
def _logits(model: LlavaOV, batch: dict) -> jax.Array:
    return model(batch)


def full_forward_logits(model: LlavaOV, engine: InferenceEngine, prompt: Prompt, answer: list[int],
                        length: int = FULL_LENGTH) -> np.ndarray:
    """Logits predicting the token after prompt + answer, from one uncached forward (right padded)."""
    sample = engine.process(list(prompt.ids) + answer, prompt.images, "f")
    batch = engine._assemble([sample], length, 1).to_model_inputs()
    return np.asarray(_logits(model, jax.tree.map(jnp.asarray, batch)))[0, sample.expanded_length - 1]


def test_buckets():
    assert [length_bucket(n) for n in (1, 64, 65, 96, 97, 129, 200)] == [64, 64, 96, 96, 128, 192, 256]
    assert [count_bucket(n) for n in (0, 1, 3, 8, 9, 17)] == [0, 1, 4, 8, 16, 24]
    assert [rows_bucket(n) for n in (1, 3, 4, 5, 9)] == [1, 3, 4, 8, 16]


def test_prepare_buckets_and_cache_segments(manager_engine):
    _, engine = manager_engine
    prompts = mixed_prompts()
    prepared = engine.prepare(prompts)
    lengths = [len(expanded_ids(engine, p)[0]) for p in prompts]
    np.testing.assert_array_equal(prepared.lengths, lengths)
    slots = prepared.prompt_slots
    assert slots == length_bucket(max(lengths)) and prepared.inputs["input_ids"].shape == (2, slots)
    # The cache is left-padded: prompt b occupies slots P - n_b .. P - 1, answers follow for all rows.
    kv_seg = engine.kv_segments(prepared, 4)
    for row, n in zip(kv_seg, lengths):
        np.testing.assert_array_equal(row, [0] * (slots - n) + [1] * (n + 4))


def test_prompts_prepared_on_threads_equal_one_by_one_and_fail_in_order(manager_engine, monkeypatch):
    """prepare preprocesses the prompts' images on the host's threads: the same batch as one
    prompt after the other, and the error of the first bad prompt in prompt order."""
    from manager_jax import host_threads
    from manager_jax.infer.engine import InputError

    _, engine = manager_engine
    if host_threads.size() < 2:
        pytest.skip("one core: prepare runs the prompts one by one")
    prompts = lambda: [Prompt([1, 2, IMAGE_TOKEN_INDEX, 3 + k], [random_image((300 + 90 * k, 200), k)]) for k in range(4)]
    threaded = engine.prepare(prompts())
    with monkeypatch.context() as m:
        m.setattr(host_threads, "size", lambda: 1)
        serial = engine.prepare(prompts())
    assert threaded.inputs.keys() == serial.inputs.keys()
    for name in threaded.inputs:
        np.testing.assert_array_equal(threaded.inputs[name], serial.inputs[name], err_msg=name)
    bad = prompts()
    bad[1] = Prompt([1, IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX], bad[1].images)  # two placeholders, one image
    bad[3] = Prompt([1, 2], bad[3].images)
    with pytest.raises(InputError, match="prompt 1:"):
        engine.prepare(bad)


def test_prepared_crops_are_normalised_in_the_model_dtype():
    """A bf16 model's prompts carry bf16 crops to the device: the processor's float32 values
    rounded as the tower's own cast would round them."""
    model = LlavaOV(tiny("baseline", image_token_id=500, dtype="bfloat16"), rngs=nnx.Rngs(0))
    engine = InferenceEngine(model, pad_id=0)
    prompt = Prompt(ids=[1, 2, IMAGE_TOKEN_INDEX, 3], images=[random_image((300, 200), 1)])
    prepared = engine.prepare([prompt])
    crops = engine.process(prompt.ids, prompt.images, "x").pixels
    got = prepared.inputs["pixel_values"][: crops.shape[0]]
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(got, normalize(crops).astype(jnp.bfloat16))


def test_cached_decoding_matches_full_forward(manager_engine):
    model, engine = manager_engine
    prompts = mixed_prompts()
    gens = engine.generate(prompts, SamplingParams(max_new_tokens=NEW))
    for prompt, gen in zip(prompts, gens):
        assert gen.finish_reason == "length" and len(gen.token_ids) == NEW
        expected = []
        for _ in range(NEW):  # greedy loop re-running the uncached forward (Manager included)
            expected.append(int(np.argmax(full_forward_logits(model, engine, prompt, expected))))
        assert gen.token_ids == expected
    assert len({t for g in gens for t in g.token_ids}) > 4

    # The public prefill / decode_step API gives the same logits as the full forward.
    prepared = engine.prepare(prompts)
    slots = prepared.prompt_slots
    logits, cache = engine.prefill(prepared, slots + 4)
    kv_seg = engine.kv_segments(prepared, 4)
    for step in range(3):
        for r, (prompt, gen) in enumerate(zip(prompts, gens)):
            ref = full_forward_logits(model, engine, prompt, gen.token_ids[:step])
            np.testing.assert_allclose(np.asarray(logits)[r], ref, atol=2e-4, rtol=2e-4)
        tokens = np.asarray([g.token_ids[step] for g in gens], np.int32)
        logits, cache = engine.decode_step(tokens, prepared.lengths + step, slots + step, cache, kv_seg)


def test_repetition_penalty_on_generated_ids(manager_engine):
    import torch
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    model, engine = manager_engine
    prompts = mixed_prompts()
    plain = engine.generate(prompts, SamplingParams(max_new_tokens=NEW))
    # 1.8 as users set it; 0.5 favours the ids generated so far, so that the answers must change
    # (greedy answers without a repeat, as this model's, are the same under any penalty above 1).
    for strength in (1.8, 0.5):
        gens = engine.generate(prompts, SamplingParams(max_new_tokens=NEW, repetition_penalty=strength))
        penalty = RepetitionPenaltyLogitsProcessor(strength)
        for prompt, gen in zip(prompts, gens):
            expected: list[int] = []
            for _ in range(NEW):  # HF's processor over the generated ids only (the prompt is not penalised)
                logits = torch.tensor(full_forward_logits(model, engine, prompt, expected))[None]
                logits = penalty(torch.tensor([expected], dtype=torch.long), logits)
                expected.append(int(logits.argmax()))
            assert gen.token_ids == expected, strength
    assert [g.token_ids for g in gens] != [g.token_ids for g in plain]


def test_eos_stops_each_row(manager_engine):
    _, engine = manager_engine
    prompts = mixed_prompts()
    free = engine.generate(prompts, SamplingParams(max_new_tokens=NEW))
    stop = free[0].token_ids[2]
    first = free[0].token_ids.index(stop)
    gens = engine.generate(prompts, SamplingParams(max_new_tokens=NEW, eos_ids=(stop, 511)))
    assert gens[0].token_ids == free[0].token_ids[: first + 1] and gens[0].finish_reason == "eos"
    other = free[1].token_ids
    if stop in other:
        assert gens[1].token_ids == other[: other.index(stop) + 1] and gens[1].finish_reason == "eos"
    else:
        assert gens[1].token_ids == other and gens[1].finish_reason == "length"


def test_fixed_token_runs_between_end_checks_keep_every_answer(manager_engine):
    """Runs of 4 or 8 tokens between the loop's checks for the end: the same tokens, ends and
    sampled draws as checking after every token, with answers ending inside a run, a
    max_new_tokens that no run length divides and one that fills the new-token buffer."""
    model, _ = manager_engine
    engines = {n: InferenceEngine(model, pad_id=0, decode_check_every=n) for n in (1, 4, 8)}
    prompts = mixed_prompts()
    free = engines[1].generate(prompts, SamplingParams(max_new_tokens=13))
    assert [len(g.token_ids) for g in free] == [13, 13]
    stop = free[0].token_ids[6]  # row 0 ends inside the second run of 4
    cases = [SamplingParams(max_new_tokens=13), SamplingParams(max_new_tokens=13, eos_ids=(stop,)),
             SamplingParams(max_new_tokens=11, temperature=1.0, top_k=50, seed=3),
             SamplingParams(max_new_tokens=16)]  # fills the 16 new slots: a step past it would overwrite the last
    for params in cases:
        expected = [(g.token_ids, g.finish_reason) for g in engines[1].generate(prompts, params)]
        for n in (4, 8):
            assert [(g.token_ids, g.finish_reason) for g in engines[n].generate(prompts, params)] == expected, (n, params)
    ended = engines[4].generate(prompts, cases[1])[0]
    assert ended.finish_reason == "eos" and len(ended.token_ids) == free[0].token_ids.index(stop) + 1
    with pytest.raises(ValueError, match="decode_check_every"):
        InferenceEngine(model, decode_check_every=0)


def test_scanned_and_unrolled_decode_layers_agree(manager_engine):
    model, unrolled = manager_engine
    scanned = InferenceEngine(model, pad_id=0, decode_scan_layers=True)
    params = SamplingParams(max_new_tokens=NEW)
    assert [g.token_ids for g in scanned.generate(mixed_prompts(), params)] == \
        [g.token_ids for g in unrolled.generate(mixed_prompts(), params)]

    def decode_step(engine):  # one decode step: (lowered StableHLO, compiled HLO, cache shape)
        prepared = engine.prepare(mixed_prompts())
        logits, cache = engine.prefill(prepared, prepared.prompt_slots + 2)
        kv_seg = jnp.asarray(engine.kv_segments(prepared, 2))
        args = (engine.state, jnp.zeros(len(prepared.lengths), jnp.int32), jnp.asarray(prepared.lengths),
                prepared.prompt_slots, cache, kv_seg)
        lowered = engine._step_jit.lower(*args)
        return lowered.as_text(), lowered.compile().as_text(), "x".join(map(str, cache[0].shape))

    def cache_dynamic_slices(text, shape):  # reads of a layer's keys/values by a traced layer index
        return sum("dynamic_slice" in line and shape in line for line in text.splitlines())

    unrolled_lowered, unrolled_hlo, shape = decode_step(unrolled)
    scanned_lowered, scanned_hlo, _ = decode_step(scanned)
    assert unrolled_hlo.count(" while(") == 0 < scanned_hlo.count(" while(")
    # Unrolled, each layer reads its cache with a static slice (a dynamic one was a copy of the
    # layer's whole cache per token on GPU); the scan still indexes by the traced layer.
    assert cache_dynamic_slices(unrolled_lowered, shape) == 0 < cache_dynamic_slices(scanned_lowered, shape)


def test_unrolled_decode_slices_the_weight_stacks_outside_the_token_loop(manager_engine):
    """The decode loop's layers are sliced out of the [L, ...] weight stacks once per call, before
    the token loop: slicing them inside it made XLA copy every weight matrix per token on GPU
    (44% of a batch-16 decode step on an H100). Inside the loop only the cache is sliced."""
    model, engine = manager_engine
    lowered = {}
    jitted = engine._decode_jit

    def capture(*args, **kwargs):
        lowered["text"] = jitted.lower(*args, **kwargs).as_text()
        return jitted(*args, **kwargs)

    engine._decode_jit = capture
    try:
        engine.generate(mixed_prompts(), SamplingParams(max_new_tokens=3))
    finally:
        engine._decode_jit = jitted
    text = lowered["text"]
    loop = text.index("stablehlo.while")
    layers = model.cfg.text.num_layers

    def stack_slices(lines):  # slices of a weight stack [L, ...]: not the KV cache (rank 5)
        shapes = (re.search(r"stablehlo\.slice .*: \(tensor<([^>]*)>\)", line) for line in lines)
        dims = [m.group(1).split("x")[:-1] for m in shapes if m]
        return [d for d in dims if 2 <= len(d) != 5 and d[0] == str(layers)]  # (rank 1: RNG keys)

    before, inside = stack_slices(text[:loop].splitlines()), stack_slices(text[loop:].splitlines())
    assert before and not inside, inside[:3]


def test_rows_without_a_prompt_do_not_hold_the_loop(baseline_engine):
    """Five prompts decode as eight rows (the bucket); the loop stops when the five answers have
    ended (before: the padding rows, which never meet an end id, ran it to max_new_tokens)."""
    model, engine = baseline_engine
    prompts = [Prompt([6, 7, 8, 9, 10 + k]) for k in range(5)]
    free = engine.generate(prompts, SamplingParams(max_new_tokens=6))
    assert engine.last_decode_steps == 6
    # Every answer ends at its first token: one step, not 40.
    firsts = tuple({g.token_ids[0] for g in free})
    gens = engine.generate(prompts, SamplingParams(max_new_tokens=40, eos_ids=firsts))
    assert [(len(g.token_ids), g.finish_reason) for g in gens] == [(1, "eos")] * 5
    assert engine.last_decode_steps == 1
    # Answers of different lengths: the loop runs as long as the longest (CPU checks every token).
    thirds = tuple({g.token_ids[2] for g in free})
    gens = engine.generate(prompts, SamplingParams(max_new_tokens=40, eos_ids=thirds))
    assert all(len(g.token_ids) <= 3 for g in gens)
    assert engine.last_decode_steps == max(len(g.token_ids) for g in gens)


def test_each_prompt_has_its_own_room_below_max_length(baseline_engine):
    """max_length bounds each prompt's answer by its own length: a short prompt batched with one
    that leaves room for 3 tokens still gets its max_new_tokens (before, every row was cut to the
    longest prompt's room, so the answer depended on the batch), at any row of the batch."""
    model, _ = baseline_engine
    engine = InferenceEngine(model, pad_id=0, max_length=20)
    short, long = Prompt([5, 6, 7]), Prompt(list(range(1, 18)))  # 17 tokens: room for 3

    def greedy(prompt, steps):  # uncached full forwards
        out: list[int] = []
        for _ in range(steps):
            out.append(int(np.argmax(full_forward_logits(model, engine, prompt, out))))
        return out

    expected = {"short": (greedy(short, 8), "length"), "long": (greedy(long, 3), "length")}
    params = SamplingParams(max_new_tokens=8)
    for order in (("short", "long"), ("long", "short")):
        prompts = [short if name == "short" else long for name in order]
        gens = engine.generate(prompts, params)
        assert [(g.token_ids, g.finish_reason) for g in gens] == [expected[name] for name in order], order
    # An end id ends a row before its limit, as before.
    stop = expected["short"][0][1]
    gens = engine.generate([short, long], SamplingParams(max_new_tokens=8, eos_ids=(stop,)))
    assert (gens[0].token_ids, gens[0].finish_reason) == (expected["short"][0][:2], "eos")


def test_decode_min_rows_pads_the_decode_and_keeps_the_answers(manager_engine):
    model, engine = manager_engine
    padded = InferenceEngine(model, pad_id=0, decode_min_rows=3)
    rows, jitted = [], padded._decode_jit
    padded._decode_jit = lambda state, first_logits, *a, **k: rows.append(first_logits.shape[0]) or jitted(
        state, first_logits, *a, **k)
    prompt = mixed_prompts()[:1]
    params = SamplingParams(max_new_tokens=NEW)
    assert [g.token_ids for g in padded.generate(prompt, params)] == [g.token_ids for g in engine.generate(prompt, params)]
    assert rows == [3]  # one prompt, decoded as three rows
    with pytest.raises(ValueError, match="decode_min_rows"):
        InferenceEngine(model, pad_id=0, decode_min_rows=0)


def test_lengths_within_a_bucket_do_not_recompile(manager_engine):
    _, engine = manager_engine
    short = engine.generate(mixed_prompts(), SamplingParams(max_new_tokens=3))
    # Counted from here: jax's compile cache is shared by the engines of this module's tests.
    decodes, prefills = engine._decode_jit._cache_size(), engine._prefill_jit._cache_size()
    full = engine.generate(mixed_prompts(), SamplingParams(max_new_tokens=NEW))
    assert [g.token_ids for g in short] == [g.token_ids[:3] for g in full]
    assert engine._decode_jit._cache_size() == decodes  # 3 and 6 share one bucket: no recompilation
    other = [Prompt([9, IMAGE_TOKEN_INDEX, 8, 7, 6, 5, 4, 3, 2], [random_image((30, 70), 8)]), Prompt([1, 2])]
    engine.generate(other, SamplingParams(max_new_tokens=2))  # other lengths, same buckets
    assert engine._prefill_jit._cache_size() == prefills and engine._decode_jit._cache_size() == decodes


def test_scoring_other_lengths_within_the_buckets_does_not_recompile(manager_engine):
    """An evaluation scores tens of thousands of requests: other prompt lengths, continuation
    lengths, images and rows within the same buckets reuse the one program."""
    _, engine = manager_engine

    def request(prompt_len, target_len, image_size, seed):
        ids = [IMAGE_TOKEN_INDEX, *range(1, prompt_len)] + list(range(20, 20 + target_len))
        return ScoreRequest(ids, prompt_len, prompt_len + target_len, [random_image(image_size, seed)])

    engine.score([request(3, 2, (40, 40), 1), request(9, 5, (90, 60), 2), request(5, 1, (60, 90), 3)])
    programs = engine._score_jit._cache_size()
    # 3 rows, prompts of 729 + 2..12 tokens, continuations of 1..8 tokens: the same buckets.
    engine.score([request(12, 8, (30, 70), 4), request(2, 3, (50, 50), 5), request(7, 6, (80, 20), 6)])
    assert engine._score_jit._cache_size() == programs


def test_sampling_seeded_and_vocab_limited(baseline_engine):
    model, _ = baseline_engine
    engine = InferenceEngine(model, pad_id=0, vocab_limit=300)
    prompts = [Prompt([5, 6, 7]), Prompt([8, 9])]

    def run(**kw):
        return [g.token_ids for g in engine.generate(prompts, SamplingParams(max_new_tokens=12, **kw))]

    hot = dict(temperature=1.5, top_p=0.95, top_k=100)
    a, b, c = run(seed=1, **hot), run(seed=1, **hot), run(seed=2, **hot)
    assert a == b and a != c
    assert max(t for row in a + c for t in row) < 300
    assert run(temperature=0.8, top_k=1, seed=3) == run()  # top-k 1 is greedy
    full = InferenceEngine(model, pad_id=0).generate(prompts, SamplingParams(max_new_tokens=12))
    assert any(t >= 300 for g in full for t in g.token_ids)  # so the limit above did something


def test_each_prompt_samples_its_own_stream_whatever_the_batch(baseline_engine):
    """Prompt i of a batch draws from random stream streams[i] (default i): a prompt repeated in one batch
    gets independent samples, and its answer is the same alone, in a batch of 4 or 2, at any row
    and beside other prompts (the audit saw copies for repeated prompts batch after batch)."""
    _, engine = baseline_engine
    params = SamplingParams(max_new_tokens=8, temperature=1.5, top_k=100, seed=5)
    same = Prompt([5, 6, 7])
    four = [g.token_ids for g in engine.generate([same] * 4, params)]
    assert len({tuple(t) for t in four}) == 4, four
    alone = [engine.generate([same], params, streams=[i])[0].token_ids for i in range(4)]
    assert alone == four
    assert [g.token_ids for g in engine.generate([same] * 2, params, streams=[3, 2])] == four[:1:-1]
    mixed = engine.generate([Prompt([8, 9, 10, 11, 12, 13]), same, Prompt([1])], params, streams=[7, 2, 9])
    assert mixed[1].token_ids == four[2]
    # Five prompts decode as eight rows (the bucket): one stream per prompt, as in any batch.
    five = engine.generate([Prompt([1])] * 2 + [same] * 3, params, streams=[11, 12, 3, 0, 1])
    assert [g.token_ids for g in five[2:]] == [four[3], four[0], four[1]]
    # Stream 0 is the seed's own key, so a lone prompt samples as before per-prompt streams.
    assert engine.generate([same], params)[0].token_ids == four[0]
    for bad in ([-1], [2**31], [1, 2], [0.5]):
        with pytest.raises(ValueError, match="streams"):
            engine.generate([same], params, streams=bad)


def test_check_prompt_measures_what_process_builds():
    """`check_prompt` (image sizes only, for checking a prompt file up front) finds the length that
    `process` builds from the pixels, for one and several grid images; bad limits are refused."""
    model = tiny_model("grid_manager")
    engine = InferenceEngine(model, pad_id=0)
    for images in ([random_image((200, 120), 1)], [random_image((90, 60), 2), random_image((40, 300), 3)]):
        ids = [1, 2, *[IMAGE_TOKEN_INDEX] * len(images), 3]
        length = engine.process(ids, images, "p").expanded_length
        sizes = [im.size for im in images]
        InferenceEngine(model, pad_id=0, max_length=length + 1).check_prompt(ids, sizes, "f.jsonl:3")
        with pytest.raises(PromptTooLongError, match=f"prompt f.jsonl:3 has {length} tokens.*max_length of {length - 1}"):
            InferenceEngine(model, pad_id=0, max_length=length - 1).check_prompt(ids, sizes, "f.jsonl:3")
        # A prompt that fills max_length leaves no room for an answer: refused up front, as generate would.
        with pytest.raises(PromptTooLongError, match=f"prompt f.jsonl:3 has {length} tokens.*no room to generate"):
            InferenceEngine(model, pad_id=0, max_length=length).check_prompt(ids, sizes, "f.jsonl:3")
    with pytest.raises(InputError, match="f.jsonl:2: 1 image placeholders but 2 images"):
        engine.check_prompt([1, IMAGE_TOKEN_INDEX], [(10, 10), (10, 10)], "f.jsonl:2")
    for bad in (dict(max_length=0), dict(max_length=-5), dict(vocab_limit=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            InferenceEngine(model, pad_id=0, **bad)


def test_a_max_length_past_the_trained_positions_warns(caplog):
    """Allowed (HF runs on past them), but no longer without a word."""
    model = tiny_model("baseline")
    trained = model.cfg.text.max_position_embeddings
    with caplog.at_level("WARNING", logger="manager_jax.infer.engine"):
        InferenceEngine(model, pad_id=0, max_length=trained)
        assert caplog.text == ""
        InferenceEngine(model, pad_id=0, max_length=trained + 1)
    assert f"max_length {trained + 1} is past the {trained} positions the model was trained for" in caplog.text


def test_sharded_generation_equals_single_device(baseline_engine):
    from manager_jax.sharding import MeshConfig, make_mesh

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices; tests/conftest.py provides them on CPU")
    model, single = baseline_engine
    prompts = [Prompt([5, 6, 7]), Prompt([8, 9]), Prompt([10, 11, 12, 13]), Prompt([14])]
    params = SamplingParams(max_new_tokens=NEW)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = InferenceEngine(model, pad_id=0, mesh=mesh)
    kernel = nnx.to_pure_dict(sharded.state)["text"]["layers"]["mlp"]["up"]["kernel"]
    assert len(kernel.sharding.device_set) > 1  # the parameters really are distributed
    expected = [g.token_ids for g in single.generate(prompts, params)]
    assert [g.token_ids for g in sharded.generate(prompts, params)] == expected


@pytest.mark.parametrize("axes", [(1, 1, 2), (1, 4, 1), (1, 1, 4)])
def test_tensor_and_fsdp_meshes_give_the_single_device_tokens_and_scores(manager_engine, axes, caplog):
    """Tensor parallel (heads, MLP and the KV cache over 2 devices) and FSDP over 4, with 3 prompts
    (an image, text only) that the 4 FSDP rows do not divide: the one-device greedy tokens, and
    log-likelihoods within fp32 rounding of the one-device scores. Tensor over 4 splits the 2 KV
    heads mid-head: the same answers, with a warning."""
    from manager_jax.sharding import MeshConfig, make_mesh

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices; tests/conftest.py provides them on CPU")
    model, single = manager_engine
    prompts = (mixed_prompts() * 2)[:3]
    requests = [ScoreRequest(list(p.ids) + [7, 8, 9], len(p.ids), len(p.ids) + 3, p.images) for p in prompts]
    params = SamplingParams(max_new_tokens=NEW)
    mesh = make_mesh(MeshConfig(*axes, num_devices=int(np.prod(axes))))
    with caplog.at_level("WARNING", logger="manager_jax.infer.engine"):
        sharded = InferenceEngine(model, pad_id=0, mesh=mesh)
    warned = [r.getMessage() for r in caplog.records if "mid-head" in r.getMessage()]
    assert warned == (["mesh tensor=4 splits attention heads mid-head: 2 text key/value heads (0.5 per device); the "
                       "results are the same, but every layer's attention regathers whole heads (slower). tensor=1 "
                       "or 2 keeps whole heads on each device (--mesh tensor=...)"] if axes[2] == 4 else [])
    assert [g.token_ids for g in sharded.generate(prompts, params)] == \
        [g.token_ids for g in single.generate(prompts, params)]
    got = [r.logprob for r in sharded.score(requests)]
    np.testing.assert_allclose(got, [r.logprob for r in single.score(requests)], rtol=1e-4, atol=1e-3)


def test_rows_that_the_data_axes_do_not_divide_are_padded_not_replicated(baseline_engine):
    """3 prompts on data=2: 4 rows, so the batch and the KV cache are split over the data axis (one
    copy of each row, not every row on every device); the answers are the one-device ones."""
    from manager_jax.sharding import MeshConfig, make_mesh

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices; tests/conftest.py provides them on CPU")
    model, single = baseline_engine
    prompts = [Prompt([5, 6, 7]), Prompt([8, 9]), Prompt([10, 11, 12, 13])]
    sharded = InferenceEngine(model, pad_id=0, mesh=make_mesh(MeshConfig(2, 1, 1, num_devices=2)))
    prepared = sharded.prepare(prompts)
    _, (k, v) = sharded.prefill(prepared)
    for c in (k, v):
        assert c.sharding.shard_shape(c.shape)[1] * 2 == c.shape[1] == 4
    params = SamplingParams(max_new_tokens=NEW)
    assert [g.token_ids for g in sharded.generate(prompts, params)] == \
        [g.token_ids for g in single.generate(prompts, params)]


def test_an_fsdp_axis_that_splits_no_large_weight_is_refused():
    """Width 36 over fsdp=8: the 1.2 MiB embedding would be whole on every device; the error says
    which mesh splits it."""
    from manager_jax.sharding import MeshConfig, make_mesh

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices; tests/conftest.py provides them on CPU")
    cfg = tiny("baseline", image_token_id=500)
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=8192, hidden_size=36, num_heads=6,
                                                  head_dim=6))
    model = LlavaOV(cfg, rngs=nnx.Rngs(0))
    refused = r"fsdp=8 divides no dimension of text\.embed\.embedding.*--mesh data=2,fsdp=4 "
    with pytest.raises(InputError, match=refused) as err:
        InferenceEngine(model, pad_id=0, mesh=make_mesh(MeshConfig(1, 8, 1)))
    assert "optimizer" not in str(err.value)  # inference holds no gradients or optimizer state
    InferenceEngine(model, pad_id=0, mesh=make_mesh(MeshConfig(2, 4, 1)))  # 4 divides 36


@pytest.mark.parametrize("axes,prompts", [((2, 2, 2), 4), ((2, 1, 4), 3)])
def test_pallas_decode_on_a_mesh_gives_the_single_device_tokens(axes, prompts, monkeypatch):
    """The fused decode kernels (interpret mode) per device on a mesh: rows over the data axes and
    KV heads over tensor (2 x 2 x 2, 4 prompts); then neither divides (tensor 4 over 2 KV heads,
    3 prompts over 2 data shards) and both are replicated. The tokens are the one-device XLA decode's."""
    from manager_jax.models import qwen2
    from manager_jax.sharding import MeshConfig, make_mesh

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices; tests/conftest.py provides them on CPU")
    calls = []
    on_mesh = qwen2.decode_attention_on_mesh
    monkeypatch.setattr(qwen2, "decode_attention_on_mesh", lambda *a, **k: calls.append(k["mesh"]) or on_mesh(*a, **k))
    model = tiny_model("manager", head_dim=32, qkv_biases=True)
    batch = (mixed_prompts() * 2)[:prompts]
    params = SamplingParams(max_new_tokens=NEW)
    mesh = make_mesh(MeshConfig(*axes))
    sharded = InferenceEngine(model, pad_id=0, mesh=mesh, decode_attention="pallas")
    expected = [g.token_ids for g in InferenceEngine(model, pad_id=0).generate(batch, params)]
    assert [g.token_ids for g in sharded.generate(batch, params)] == expected
    assert calls and all(m is mesh for m in calls)  # every layer's kernels ran on the mesh


@pytest.mark.parametrize("sharded", [False, True])
def test_splash_prefill_and_scoring_equal_the_xla_path(manager_engine, sharded, monkeypatch):
    """attention_impl="splash" (the TPU kernel, Pallas interpret mode on CPU) in prefill and scoring."""
    from manager_jax.models import attention
    from manager_jax.sharding import MeshConfig, make_mesh

    if sharded and len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices; tests/conftest.py provides them on CPU")
    model, xla_engine = manager_engine
    graphdef, state = nnx.split(model)
    splash_model = nnx.merge(graphdef, state)
    splash_model.text.layers.attn.impl = "splash"
    splash_model.vision.attention_impl = splash_model.vision.layers.attn.impl = "splash"  # crops too
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=2, num_devices=4)) if sharded else None
    engine = InferenceEngine(splash_model, pad_id=0, mesh=mesh)
    traced = []
    real = attention._splash_local
    monkeypatch.setattr(attention, "_splash_local",
                        lambda *a, **k: traced.append((k["causal"], a[0].shape)) or real(*a, **k))

    prompts = [mixed_prompts()[0], Prompt([3, IMAGE_TOKEN_INDEX, 9, 8], [random_image((50, 80), 9)])]
    params = SamplingParams(max_new_tokens=NEW)
    assert [g.token_ids for g in engine.generate(prompts, params)] == \
        [g.token_ids for g in xla_engine.generate(prompts, params)]
    requests = [ScoreRequest([1, IMAGE_TOKEN_INDEX, 4, 5, 6, 7], 3, 6, [random_image((40, 40), 3)])]
    (got,), (expected,) = engine.score(requests), xla_engine.score(requests)
    assert got.logprob == pytest.approx(expected.logprob, rel=1e-5, abs=1e-4) and got.is_greedy == expected.is_greedy
    # The kernel ran on the text rows (768 slots: 729 image tokens + text; sharded: rows and heads
    # split in two) and on the crops (729 tokens padded to 768; sharded: heads split in two).
    text = [shape for causal, shape in traced if causal]
    crops = [shape for causal, shape in traced if not causal]
    assert text and crops and all(shape[1] == 768 for _, shape in traced)
    assert {shape[0] for shape in text} == ({1} if sharded else {2, 1})
    assert {shape[2] for shape in text} == ({2} if sharded else {4})
    assert {shape[2] for shape in crops} == {model.cfg.vision.num_heads // (2 if sharded else 1)}


def test_input_errors(manager_engine):
    model, engine = manager_engine
    with pytest.raises(InputError, match="1 image placeholders but 0 images"):
        engine.prepare([Prompt([1, IMAGE_TOKEN_INDEX, 2])])
    with pytest.raises(InputError, match="outside the model vocabulary"):
        engine.prepare([Prompt([1, 100000])])
    with pytest.raises(InputError, match="no prompts"):
        engine.prepare([])
    short = InferenceEngine(model, pad_id=0, max_length=500)
    with pytest.raises(PromptTooLongError, match=r"731 tokens after image expansion .* the max_length of 500"):
        short.prepare([Prompt([1, IMAGE_TOKEN_INDEX, 2], [random_image((40, 40), 1)])])
    with pytest.raises(PromptTooLongError, match="no room"):
        InferenceEngine(model, pad_id=0, max_length=3).generate([Prompt([1, 2, 3])])


def test_pallas_decode_attention_gives_the_xla_decodes_tokens():
    """The fused decode-attention kernel (Pallas interpret mode here) in the whole decode loop:
    prompts of different lengths (left padding the kernel skips) and image counts, greedy. Heads of
    32, the smallest the kernels take."""
    model = tiny_model("manager", head_dim=32, qkv_biases=True)
    engine = InferenceEngine(model, pad_id=0)
    fused = InferenceEngine(model, pad_id=0, decode_attention="pallas", decode_check_every=4)
    lowered, jitted = [], fused._decode_jit
    fused._decode_jit = lambda *a, **k: lowered.append(jitted.lower(*a, **k).as_text()) or jitted(*a, **k)
    params = SamplingParams(max_new_tokens=NEW)
    assert [g.token_ids for g in fused.generate(mixed_prompts(), params)] == \
        [g.token_ids for g in engine.generate(mixed_prompts(), params)]
    # The kernel ran: one call per layer and token step (a run's 4 unrolled steps, the single-token rest).
    assert len(re.findall(r"call @decode_attention(_\d+)?\(", lowered[0])) == 5 * model.cfg.text.num_layers
    for bad, match in (({"decode_attention": "cudnn"}, "decode_attention must be"),
                       ({"decode_attention": "pallas", "decode_scan_layers": True}, "unrolled decode")):
        with pytest.raises(ValueError, match=match):
            InferenceEngine(model, pad_id=0, **bad)


def test_pallas_decode_matmuls_give_the_xla_decodes_tokens():
    """The decode projections on the fused kernels of models/decode_matmul.py (interpret mode here)
    with the attention kernels: the greedy tokens of the XLA decode, for prompts of different
    lengths and image counts, at batch 2 and 1; configs are speed only."""
    from manager_jax.models.decode_matmul import MatmulConfig

    model = tiny_model("manager", head_dim=32, qkv_biases=True)
    engine = InferenceEngine(model, pad_id=0)
    small = MatmulConfig(block_n=16, block_k=16, num_stages=1)
    fused = InferenceEngine(model, pad_id=0, decode_attention="pallas", decode_matmul="pallas", decode_check_every=4,
                            decode_matmul_kernels={"gate_up": small, "down": dataclasses.replace(small, splits=4)})
    lowered, jitted = [], fused._decode_jit
    fused._decode_jit = lambda *a, **k: lowered.append(jitted.lower(*a, **k).as_text()) or jitted(*a, **k)
    params = SamplingParams(max_new_tokens=NEW)
    for prompts in (mixed_prompts(), mixed_prompts()[:1]):
        assert [g.token_ids for g in fused.generate(prompts, params)] == \
            [g.token_ids for g in engine.generate(prompts, params)]
    # Per layer and token step (a run's 4 unrolled steps, the single-token rest): one norm + q/k/v
    # kernel, one gated kernel and two matmul + residual kernels.
    steps = 5 * model.cfg.text.num_layers
    for name, calls in (("norm_qkv", steps), ("norm_gated", steps), ("matmul_add", 2 * steps)):
        assert len(re.findall(rf"call @{name}(_\d+)?\(", lowered[0])) == calls, name
    for bad, match in (({"decode_matmul": "triton"}, "decode_matmul must be"),
                       ({"decode_matmul": "pallas", "decode_attention": "xla"}, "needs decode_attention='pallas'"),
                       ({"decode_attention": "pallas", "decode_matmul_kernels": {"mlp": small}}, "maps one of"),
                       ({"decode_attention": "pallas", "decode_matmul_kernels": {"o": "16,16,4,1"}}, "maps one of"),
                       ({"decode_attention": "pallas", "decode_matmul_kernels": {"qkv": MatmulConfig(splits=2)}},
                        "splits of the input are for")):
        with pytest.raises(ValueError, match=match):
            InferenceEngine(model, pad_id=0, **bad)


def test_pallas_decode_matmuls_leave_weights_of_another_dtype_to_xla():
    """bf16 compute over fp32 weights: the kernels would need a cast copy of every weight each token
    (XLA fuses the cast into its matmuls), so those layers keep XLA's projections."""
    cfg = tiny("manager", image_token_id=500)
    cfg = cfg.replace(dtype="bfloat16", text=dataclasses.replace(cfg.text, head_dim=32))
    model = LlavaOV(cfg, rngs=nnx.Rngs(3))
    fused = InferenceEngine(model, pad_id=0, decode_attention="pallas", decode_matmul="pallas")
    lowered, jitted = [], fused._decode_jit
    fused._decode_jit = lambda *a, **k: lowered.append(jitted.lower(*a, **k).as_text()) or jitted(*a, **k)
    fused.generate(mixed_prompts()[1:], SamplingParams(max_new_tokens=2))
    assert "call @decode_attention" in lowered[0] and "call @norm_qkv" not in lowered[0]


def test_decode_kernel_configs_reach_the_kernel_by_rows_and_keep_the_tokens(monkeypatch):
    """`decode_kernels` picks the kernels' division of the work by the rows decoded together (a
    spy records the config each kernel call gets); the tokens stay the XLA decode's."""
    from manager_jax.models import qwen2
    from manager_jax.models.decode_attention import KernelConfig, decode_attention

    seen = []
    spy = lambda *a, **k: seen.append((a[0].shape[0], k["config"])) or decode_attention(*a, **k)
    monkeypatch.setattr(qwen2, "decode_attention", spy)
    model = tiny_model("manager", head_dim=32, qkv_biases=True)
    one_split, many = KernelConfig(block=16, programs=1, num_stages=1), KernelConfig(block=32, programs=10_000)
    tuned = InferenceEngine(model, pad_id=0, decode_attention="pallas", decode_kernels={2: one_split, 3: many})
    plain = InferenceEngine(model, pad_id=0)
    params = SamplingParams(max_new_tokens=NEW)
    prompts = mixed_prompts()
    for batch in (prompts, prompts + prompts[:1], prompts[:1]):
        assert [g.token_ids for g in tuned.generate(batch, params)] == [g.token_ids for g in plain.generate(batch, params)]
    assert set(seen) == {(2, one_split), (3, many), (1, KernelConfig.default_for(1))}  # 1 row: not listed, the default
    with pytest.raises(ValueError, match="decode_kernels maps rows"):
        InferenceEngine(model, pad_id=0, decode_kernels={0: one_split})
    with pytest.raises(ValueError, match="decode_kernels maps rows"):
        InferenceEngine(model, pad_id=0, decode_kernels={2: "128,264,4,2"})


def test_decode_attention_auto_picks_the_kernels_on_gpus_only(monkeypatch):
    from manager_jax.sharding import MeshConfig, make_mesh

    model = tiny_model("manager", head_dim=32, qkv_biases=True)
    assert InferenceEngine(model, pad_id=0).decode_attention == "xla"  # this CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert InferenceEngine(model, pad_id=0).decode_attention == "pallas"
    assert InferenceEngine(model, pad_id=0, decode_scan_layers=True).decode_attention == "xla"
    # On a mesh too: each device runs the kernels on its rows and heads.
    assert InferenceEngine(model, pad_id=0, mesh=make_mesh(MeshConfig(data=2, fsdp=-1))).decode_attention == "pallas"
    # A jax without Pallas's Triton backend (deprecated since 0.11) decodes with XLA's attention.
    monkeypatch.setattr("manager_jax.infer.engine.decode_kernels_available", lambda: False)
    assert InferenceEngine(model, pad_id=0).decode_attention == "xla"


def test_stopping_on_several_eos_ids_at_different_steps(baseline_engine):
    """Several end ids (generation_config.json's list): a row ending at its first token on one, a
    row ending later on another, a row meeting none; each answer is its free answer cut after its
    first end id, the others untouched, also with the pad id an end id (Qwen2: <|endoftext|> is
    both) and with max_new_tokens 1."""
    model, engine = baseline_engine
    prompts = [Prompt([5, 6, 7]), Prompt([8, 9, 10, 11]), Prompt([12, 13])]
    free = [g.token_ids for g in engine.generate(prompts, SamplingParams(max_new_tokens=8))]
    first, later = free[0][0], free[1][3]
    ends = (first, later)

    def cut(answer):
        stop = next((i for i, t in enumerate(answer) if t in ends), None)
        return (answer, "length") if stop is None else (answer[: stop + 1], "eos")

    expected = [cut(a) for a in free]
    assert expected[0] == ([first], "eos") and len(expected[1][0]) <= 4
    for pad in (0, first, later):
        padded = InferenceEngine(model, pad_id=pad)
        gens = padded.generate(prompts, SamplingParams(max_new_tokens=8, eos_ids=ends))
        assert [(g.token_ids, g.finish_reason) for g in gens] == expected, pad
        assert padded.last_decode_steps == max(len(t) for t, _ in expected)
    one = engine.generate(prompts, SamplingParams(max_new_tokens=1, eos_ids=ends))
    assert [(g.token_ids, g.finish_reason) for g in one] == [
        ([a[0]], "eos" if a[0] in ends else "length") for a in free]


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (7, 1)], ids=["gqa1", "gqa2", "gqa7"])
def test_every_attention_impl_gives_the_xla_logits(heads, kv_heads):
    """Prefill and decode logits (left-padded cache, a one-token prompt, prompt lengths and buckets
    not multiples of 128) and scores under each `attention_impl` the config accepts, against "xla".
    On CPU "splash" runs the Splash kernel in interpret mode; it refused the engine's prompt
    buckets that are not multiples of 128 (64, 96, 192, ...), so generation failed."""
    from manager_jax.config import ATTENTION_IMPLS
    from manager_jax.infer.engine import ScoreRequest

    prompts = [Prompt(list(range(1, 9))), Prompt([5]), Prompt(list(range(10, 140)))]
    results = {}
    for impl in ATTENTION_IMPLS:
        cfg = tiny("baseline", attention_impl=impl)
        cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_heads=heads, num_kv_heads=kv_heads))
        model = LlavaOV(cfg, rngs=nnx.Rngs(3))
        model.text.embed.embedding[...] = jax.random.normal(jax.random.key(4), model.text.embed.embedding.shape)
        engine = InferenceEngine(model, pad_id=0)
        prepared = engine.prepare(prompts)
        logits, cache = engine.prefill(prepared, prepared.prompt_slots + 2)
        kv_seg = engine.kv_segments(prepared, 2)
        tokens = np.asarray([7, 8, 9] + [0] * (len(prepared.lengths) - 3), np.int32)
        step, _ = engine.decode_step(tokens, prepared.lengths, prepared.prompt_slots, cache, kv_seg)
        scores = engine.score([ScoreRequest(list(range(1, 200)), 150, 199), ScoreRequest([3, 4], 1, 2)])
        results[impl] = (np.asarray(logits)[:3], np.asarray(step)[:3], [s.logprob for s in scores])
    for impl, (prefill, step, scores) in results.items():
        np.testing.assert_allclose(prefill, results["xla"][0], rtol=1e-5, atol=1e-5, err_msg=impl)
        np.testing.assert_allclose(step, results["xla"][1], rtol=1e-5, atol=1e-5, err_msg=impl)
        np.testing.assert_allclose(scores, results["xla"][2], rtol=1e-5, atol=1e-5, err_msg=impl)
