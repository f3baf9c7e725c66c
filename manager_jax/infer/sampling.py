"""Next-token selection: greedy, or sampling with temperature / top-k / top-p (HF semantics).

The order of HF generation is kept: the repetition penalty (a logits processor, applied in greedy
mode too), then the warpers temperature, top-k, top-p, then a categorical draw. Every knob is a
traced value, so changing it never recompiles; only the choice greedy vs sampling is static
(greedy skips the vocabulary sort).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp

NEG_INF = float("-inf")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. `temperature == 0` means greedy (argmax), like `do_sample=False`.

    top_k: keep the k most likely tokens (0 = off). top_p: keep the smallest set of tokens whose
    probability mass reaches top_p (1.0 = off). seed: the sampling RNG seed. eos_ids: stop ids
    overriding the engine's. repetition_penalty: HF's penalty (1.0 = off) on the ids generated so
    far; the prompt is not penalised, as in the original evaluation, where the prompt reaches
    `generate` as embeddings (SPEC §7.2 step 10).
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    eos_ids: tuple[int, ...] | None = None  # None: the engine's (the checkpoint's eos ids)
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if not 0 <= self.seed < 2**32:  # the key's 32 bits: a larger seed would wrap onto a smaller one's draws
            raise ValueError(f"seed must lie in [0, 2**32), got {self.seed}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1.0 = off), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def limit_vocab(logits: jax.Array, vocab_limit: jax.Array | int | None) -> jax.Array:
    """Logits [..., V] with ids >= vocab_limit set to -inf (the original evaluation shrinks the
    embedding to len(tokenizer), so those ids can never be produced nor take probability mass)."""
    if vocab_limit is None:
        return logits
    ids = jnp.arange(logits.shape[-1])
    return jnp.where(ids < vocab_limit, logits, NEG_INF)


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: jax.Array | float) -> jax.Array:
    """HF RepetitionPenaltyLogitsProcessor: for ids already produced (`seen` [B, V] bool), negative
    logits are multiplied and positive ones divided by `penalty`."""
    penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalized, logits)


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Temperature, top-k and top-p applied to fp32 logits [B, V] as HF's warpers; removed tokens get -inf.

    The values are HF's (logits / temperature), so are the ties: top-k keeps every token tied with
    the k-th; top-p cuts in HF's sort order (ascending, equal logits by id: torch's stable sort),
    so of the tokens tied at its boundary only those after it stay (bf16 logits tie often).
    top_p >= 1 filters nothing: HF adds no top-p warper then, while the cumulative sum, rounded,
    can reach 1 before the tail. Temperature 0 (HF refuses it) or one so small that the best logit
    overflows is the limit T -> 0: the tied best tokens only.
    """
    logits = logits.astype(jnp.float32)
    best = jnp.max(logits, axis=-1, keepdims=True)
    limit = jnp.where(logits == best, 0.0, NEG_INF)
    logits = jnp.where(jnp.isfinite(best / temperature), logits / temperature, limit)
    vocab = logits.shape[-1]
    ids = jnp.broadcast_to(jnp.arange(vocab, dtype=jnp.int32), logits.shape)
    sorted_asc, sorted_ids = jax.lax.sort((logits, ids), dimension=-1, is_stable=True, num_keys=1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(sorted_asc, jnp.broadcast_to(vocab - k, logits.shape[:-1])[..., None], axis=-1)
    logits = jnp.where(logits < kth, NEG_INF, logits)
    sorted_asc = jnp.where(sorted_asc < kth, NEG_INF, sorted_asc)
    # top-p as HF computes it: the ascending cumulative mass (summed from the least likely, so the
    # tail is not lost to rounding); sorted position j goes when the mass up to it is <= 1 - top_p,
    # the last (most likely) stays. The removed positions are a prefix: the first kept one, by
    # value and id, is the cut.
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_asc, axis=-1), axis=-1)
    removed = (cumulative <= 1.0 - top_p) & (jnp.arange(vocab) < vocab - 1) & (top_p < 1.0)
    first = jnp.sum(removed, axis=-1, keepdims=True)
    cut_value = jnp.take_along_axis(sorted_asc, first, axis=-1)
    cut_id = jnp.take_along_axis(sorted_ids, first, axis=-1)
    keep = (logits > cut_value) | ((logits == cut_value) & (ids >= cut_id))
    return jnp.where(keep, logits, NEG_INF)


def row_keys(key: jax.Array, streams: jax.Array) -> jax.Array:
    """One key per row [B] from the seed's key and each row's stream number [B] int32.

    Stream 0 is the seed's key itself (so one prompt samples as a single-row batch always did);
    stream i > 0 is `fold_in(key, i)`. A row's draws thus depend on its stream number only, not on
    the batch it is decoded in nor its place there.
    """
    folded = jax.random.key_data(jax.vmap(lambda s: jax.random.fold_in(key, s))(streams))
    base = jnp.broadcast_to(jax.random.key_data(key), folded.shape)
    chosen = jnp.where((streams == 0).reshape((-1,) + (1,) * (folded.ndim - 1)), base, folded)
    return jax.random.wrap_key_data(chosen, impl=jax.random.key_impl(key))


def split_rows(keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`key, sub = jax.random.split(key)` for every row's key [B]."""
    pairs = jax.vmap(jax.random.split)(keys)
    return pairs[:, 0], pairs[:, 1]


def select_tokens(
    logits: jax.Array,
    key: jax.Array,
    *,
    greedy: bool,
    temperature: jax.Array | float = 1.0,
    top_k: jax.Array | int = 0,
    top_p: jax.Array | float = 1.0,
) -> jax.Array:
    """logits [B, V] -> token ids [B] int32. `greedy` is static; the rest may be traced.

    `key`: one key for the whole batch, or one per row ([B], `row_keys`): row b then draws with
    key[b] alone, exactly as a single-row batch with that key would.
    """
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, jnp.asarray(temperature, jnp.float32), jnp.asarray(top_k, jnp.int32),
                             jnp.asarray(top_p, jnp.float32))
    if key.ndim == 1:
        return jax.vmap(lambda k, row: jax.random.categorical(k, row[None], axis=-1)[0])(key, filtered).astype(jnp.int32)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
