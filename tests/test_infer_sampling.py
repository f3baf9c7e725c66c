"""Token selection: HF logits-warper semantics (checked against transformers' own warpers),
greedy, the vocabulary limit and the sampling distribution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from manager_jax.infer.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    filter_logits,
    limit_vocab,
    select_tokens,
)


def hf_filtered(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    scores = torch.tensor(logits)
    ids = torch.zeros((logits.shape[0], 1), dtype=torch.long)
    scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    return scores.numpy()


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.9), (0.5, 20, 0.8), (1.0, 3, 0.5), (2.0, 0, 0.05)],
)
def test_filter_logits_matches_transformers_warpers(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32) * 3
    ours = np.asarray(filter_logits(jnp.asarray(logits), jnp.float32(temperature), jnp.int32(top_k),
                                    jnp.float32(top_p)))
    ref = hf_filtered(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
    kept = np.isfinite(ref)
    np.testing.assert_allclose(ours[kept], ref[kept], rtol=1e-6)
    assert 1 <= kept.sum(axis=1).min()


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (50, 1.0), (0, 0.99), (0, 0.9)])
def test_warped_support_on_a_full_vocabulary_equals_transformers(top_k, top_p):
    """Qwen2's 151936 ids, from a flat row to one dominated by a token as a trained model gives:
    the ids that can be drawn are HF's. top_p 1.0 is HF's "off" (no warper): a cumulative sum
    rounded to 1 before the tail must not cut the unlikely ids."""
    rng = np.random.default_rng(3)
    logits = (rng.normal(size=(4, 151936)) * 4).astype(np.float32)
    logits[:, 7] += np.array([0, 10, 20, 30], np.float32)
    ours = np.asarray(filter_logits(jnp.asarray(logits), jnp.float32(1.0), jnp.int32(top_k), jnp.float32(top_p)))
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(hf_filtered(logits, 1.0, top_k, top_p)))


def test_greedy_and_top_k_one_pick_the_argmax():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(8, 100)), jnp.float32)
    expected = np.argmax(np.asarray(logits), axis=-1)
    key = jax.random.key(0)
    np.testing.assert_array_equal(select_tokens(logits, key, greedy=True), expected)
    np.testing.assert_array_equal(select_tokens(logits, key, greedy=False, temperature=1.0, top_k=1), expected)


def test_sampling_follows_the_filtered_distribution():
    logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]], jnp.float32))
    keys = jax.random.split(jax.random.key(0), 10000)
    draw = jax.vmap(lambda k: select_tokens(logits, k, greedy=False, temperature=1.0, top_p=0.8)[0])
    counts = np.bincount(np.asarray(draw(keys)), minlength=5) / 10000
    # top_p 0.8 keeps 0.5, 0.2, 0.15 (mass before 0.15 is 0.7 < 0.8; before 0.1 is 0.85), renormalised.
    np.testing.assert_allclose(counts, [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0], atol=0.02)


def test_vocab_limit_excludes_high_ids():
    logits = jnp.zeros((2, 10)).at[:, 8].set(5.0)  # the best id lies beyond the limit
    limited = limit_vocab(logits, 6)
    assert np.all(np.isneginf(np.asarray(limited)[:, 6:]))
    assert np.all(np.asarray(select_tokens(limited, jax.random.key(0), greedy=True)) < 6)
    samples = jax.vmap(lambda k: select_tokens(limited, k, greedy=False))(jax.random.split(jax.random.key(1), 200))
    assert np.asarray(samples).max() < 6
    np.testing.assert_array_equal(limit_vocab(logits, None), logits)


def test_repetition_penalty_matches_transformers():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(3, 40)).astype(np.float32) * 2
    generated = rng.integers(0, 40, (3, 6))  # with repeats inside a row
    seen = np.zeros((3, 40), bool)
    np.put_along_axis(seen, generated, True, axis=1)
    for penalty in (1.0, 1.1, 0.7):
        ref = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor(generated), torch.tensor(logits)).numpy()
        ours = apply_repetition_penalty(jnp.asarray(logits), jnp.asarray(seen), penalty)
        np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-6)


@pytest.mark.parametrize("kwargs", [dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0),
                                    dict(top_p=1.5), dict(top_k=-2), dict(repetition_penalty=0.0)])
def test_sampling_params_reject_bad_values(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_greedy_flag():
    assert SamplingParams(temperature=0.0).greedy and not SamplingParams(temperature=0.5).greedy


def test_row_keys_draw_each_row_as_a_batch_of_one():
    """With one key per row, row b's token is what a one-row batch with key b draws; stream 0 is
    the seed's key itself and other streams differ from it and from each other."""
    from manager_jax.infer.sampling import row_keys, split_rows

    logits = jax.random.normal(jax.random.key(9), (4, 50)) * 3
    key = jax.random.key(11)
    keys = row_keys(key, jnp.asarray([0, 1, 2, 7], jnp.int32))
    data = np.asarray(jax.random.key_data(keys))
    assert np.array_equal(data[0], np.asarray(jax.random.key_data(key)))
    assert len({tuple(d) for d in data}) == 4
    assert np.array_equal(data[3], np.asarray(jax.random.key_data(jax.random.fold_in(key, 7))))
    rows = select_tokens(logits, keys, greedy=False, temperature=1.0)
    one_by_one = [int(select_tokens(logits[b : b + 1], keys[b], greedy=False, temperature=1.0)[0]) for b in range(4)]
    assert np.asarray(rows).tolist() == one_by_one
    nxt, sub = split_rows(keys)
    for b in range(4):
        k, s = jax.random.split(keys[b])
        assert np.array_equal(jax.random.key_data(nxt[b]), jax.random.key_data(k))
        assert np.array_equal(jax.random.key_data(sub[b]), jax.random.key_data(s))


@pytest.mark.parametrize("field, value", [("temperature", float("inf")), ("temperature", float("nan")),
                                          ("repetition_penalty", float("nan")), ("repetition_penalty", float("inf")),
                                          ("top_p", float("nan"))])
def test_non_finite_sampling_values_are_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def hf_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The distribution HF samples from (softmax of the warped scores), in float64."""
    return torch.softmax(torch.tensor(hf_filtered(logits, temperature, top_k, top_p), dtype=torch.float64), -1).numpy()


def our_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    filtered = filter_logits(jnp.asarray(logits), jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
    return np.asarray(jax.nn.softmax(filtered, axis=-1), np.float64)


@pytest.mark.parametrize("top_k, top_p", [(0, 0.5), (0, 1e-4), (2, 0.7), (0, 0.75)])
def test_top_p_ties_are_cut_like_transformers(top_k, top_p):
    """Exact ties at the top-p boundary (flat rows; bf16 logits have many): HF keeps the tokens
    after the boundary in its sort order (ascending, equal logits by id), not every tied token, so
    a flat row with top_p 0.5 keeps half of it and top_p -> 0 one token (min_tokens_to_keep=1)."""
    logits = np.asarray([[0.0] * 10, [1, 3, 3, 0, 3, 2, 3, 1, 1, 0], [2, 2, 2, 2, -np.inf, 5, 5, 2, 2, 2]],
                        np.float32)
    ours, ref = our_probs(logits, 1.0, top_k, top_p), hf_probs(logits, 1.0, top_k, top_p)
    np.testing.assert_array_equal(ours > 0, ref > 0)
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def top_p_borderline(logits: np.ndarray, temperature: float, top_k: int, top_p: float, tol: float = 2e-6) -> np.ndarray:
    """[B, V] the tokens whose fate under top-p rests on rounding: in HF's order (ascending, equal
    logits by id) their exact (float64) cumulative mass is within `tol` of 1 - top_p. An fp32
    cumulative sum over 10^5 tokens is off by up to about 1e-6, in an order and with an exp that
    depend on the library and the CPU's vector width: HF's torch and our XLA disagreed on one such
    token (1.5e-6 and 8e-8 from the threshold) on one machine and not on another; ours kept the exact
    set there."""
    border = np.zeros(logits.shape, bool)
    for b, row in enumerate(logits / np.float32(temperature)):
        if 0 < top_k < row.size:  # HF's top-k keeps every token tied with the k-th
            row = np.where(row < np.sort(row)[-top_k], -np.inf, row)
        order = np.lexsort((np.arange(row.size), row))
        x = row[order].astype(np.float64)
        probs = np.where(np.isfinite(x), np.exp(x - x.max()), 0.0)
        cumulative = np.cumsum(probs / probs.sum())
        border[b, order] = np.abs(cumulative - (1.0 - top_p)) <= tol
    return border


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 0.9), (1.0, 0, 0.5), (0.7, 50, 0.8), (1.3, 0, 0.99),
                                                       (0.7, 20, 0.95), (1.0, 200000, 0.3)])
def test_bf16_logits_over_qwen2s_vocabulary_keep_transformers_tokens(temperature, top_k, top_p):
    """Model logits in bf16 (fp32 copies, as HF generate takes them): ties everywhere, from flat
    rows to peaked ones. Every token has HF's fate but the few whose cumulative mass lies within
    rounding of the top-p threshold (`top_p_borderline`), with HF's probabilities. Which of the
    tokens tied at the cut stay is torch's sort order in HF, unstable beyond a few dozen ids; ours
    takes the highest ids."""
    rng = np.random.default_rng(5)
    logits = (rng.normal(size=(4, 151936)) * np.array([[1], [2], [4], [4]])).astype(np.float32)
    logits[:, 7] += np.array([0, 5, 10, 20], np.float32)
    logits[:, 151646:] = -np.inf  # the vocabulary limit
    logits = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
    ours, ref = our_probs(logits, temperature, top_k, top_p), hf_probs(logits, temperature, top_k, top_p)
    border = top_p_borderline(logits, temperature, top_k, top_p)
    assert border.sum() < 100  # 4e-6 of probability mass per row: the comparison stays token by token
    cut = np.where(ref > 0, logits, np.inf).min(axis=1, keepdims=True)
    settled = ~border & (logits != cut)  # ties at HF's cut: torch's unstable order decides there
    np.testing.assert_array_equal((ours > 0)[settled], (ref > 0)[settled])
    np.testing.assert_array_less(np.abs((ours > 0).sum(axis=1) - (ref > 0).sum(axis=1)), border.sum(axis=1) + 1)
    # Renormalised over sets that differ by at most the borderline tokens' mass (about 1e-5).
    np.testing.assert_allclose(ours[settled], ref[settled], rtol=1e-4, atol=1e-9)
    own_cut = np.where(ours > 0, logits, np.inf).min(axis=1, keepdims=True)
    kept_at_cut = (ours > 0) & (logits == own_cut)
    for row, tied in zip(kept_at_cut, logits == own_cut):  # the highest tied ids
        assert np.array_equal(np.nonzero(row)[0], np.nonzero(tied)[0][len(np.nonzero(tied)[0]) - row.sum():])


@pytest.mark.parametrize("temperature", [1e-7, 1e-8, 1e-20])
def test_very_small_temperatures_divide_like_transformers(temperature):
    """No floor on the temperature: logits 1e-6 apart at temperature 1e-7 are e^10 apart in
    probability, as in HF (a floor of 1e-6 made it e^1)."""
    logits = np.asarray([[0.0, 1e-6, -1.0, 1e-6 - 2e-7]], np.float32)
    np.testing.assert_allclose(our_probs(logits, temperature, 0, 1.0), hf_probs(logits, temperature, 0, 1.0),
                               atol=1e-6)


def test_temperature_zero_when_sampling_draws_among_the_tied_best():
    """HF refuses do_sample with temperature 0 (SamplingParams makes it greedy). Called with it
    anyway, the sampler takes the limit of temperature -> 0: the argmax, ties drawn uniformly,
    never a NaN."""
    logits = np.asarray([[1.0, 3.0, 3.0, 2.0, -np.inf]], np.float32)
    np.testing.assert_allclose(our_probs(logits, 0.0, 0, 1.0), [[0, 0.5, 0.5, 0, 0]])
    draws = jax.vmap(lambda k: select_tokens(jnp.asarray(logits), k, greedy=False, temperature=0.0)[0])(
        jax.random.split(jax.random.key(0), 400))
    assert set(np.asarray(draws).tolist()) == {1, 2}


@pytest.mark.parametrize("probs, temperature, top_k, top_p", [
    ([0.3, 0.25, 0.15, 0.12, 0.08, 0.05, 0.03, 0.02], 1.0, 0, 1.0),
    ([0.3, 0.25, 0.15, 0.12, 0.08, 0.05, 0.03, 0.02], 0.7, 0, 0.8),
    ([0.3, 0.25, 0.15, 0.12, 0.08, 0.05, 0.03, 0.02], 1.8, 5, 1.0),
    ([0.3, 0.25, 0.15, 0.12, 0.08, 0.05, 0.03, 0.02], 1.2, 6, 0.9),
    ([0.3, 0.2, 0.2, 0.2, 0.1], 1.0, 0, 0.6),  # the cut falls inside the tie
])
def test_draws_follow_transformers_distribution(probs, temperature, top_k, top_p):
    """20000 draws with per-row keys (as the decode loop draws) against HF's warped distribution:
    nothing outside its support, and a chi-square statistic far below what a wrong distribution
    gives (the bound df + 8 sqrt(2 df) + 10 lies beyond the 1e-6 tail; the seed is fixed)."""
    from manager_jax.infer.sampling import row_keys

    logits = np.log(np.asarray([probs], np.float32))
    expected = hf_probs(logits, temperature, top_k, top_p)[0]
    n = 20000
    keys = row_keys(jax.random.key(123), jnp.arange(n, dtype=jnp.int32))
    draws = select_tokens(jnp.broadcast_to(jnp.asarray(logits), (n, len(probs))), keys, greedy=False,
                          temperature=temperature, top_k=top_k, top_p=top_p)
    counts = np.bincount(np.asarray(draws), minlength=len(probs))
    support = expected > 0
    assert counts[~support].sum() == 0
    chi2 = (((counts - n * expected) ** 2)[support] / (n * expected[support])).sum()
    df = support.sum() - 1
    assert chi2 < df + 8 * np.sqrt(2 * df) + 10, (chi2, counts / n, expected)
