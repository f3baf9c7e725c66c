"""A decode step's attention block as two GPU kernels (Pallas on Triton).

The XLA path of a decode step runs, per layer, after the q/k/v matmul: a fusion that adds the
query's bias and RoPE, two in-place cache writes (the new key, with its bias and RoPE, and the new
value), then attention in four kernels: the scores matmul (fp32 scores [B, KV, G, S] written to
memory), the masked softmax, the probabilities-times-values matmul (split over the keys) and its
reduction. Here the same work is two kernels:

- the main kernel takes the q/k/v matmul's output as it is (without bias; XLA merges the three
  matmuls into one, whose output goes in without a copy), adds the biases and RoPE, writes the
  new key and value into the cache in place, and attends each query group over the cache before
  the query's slot with flash attention's online softmax, one program per (row, KV head, split of
  the keys); the scores never leave the chip;
- the combine kernel, one program per query head, merges the splits' partial outputs and the
  query's own new key.

Mask: the rule of :func:`manager_jax.models.attention.segment_causal_mask` for a single query at
cache slot `q_slot`: key slot s is seen when `kv_seg[b, s] == q_seg[b]` and `s <= q_slot`; the
query's own slot holds its own token, which it always sees. Blocks after the query's slot, and
blocks without a key of the query's segment (a shorter prompt's left padding), are not read.

The kernels read the layer's keys straight out of the whole cache [L, B, S, KV, d] (no slice is
copied); `layer` is static, as in the unrolled decode step. Off the GPU they run in Pallas
interpret mode, which is how the tests check them against the XLA path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# Query heads of one KV head are padded to this many rows: Triton's matmuls need 16.
_MIN_ROWS = 16
# Programs to aim for: two per streaming multiprocessor of an H100 (132), so that the key reads
# keep the whole memory system busy at batch 1 as at batch 16.
_TARGET_PROGRAMS = 264
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)


def key_block(cache_len: int) -> int | None:
    """The key block the kernel streams for a cache of this length (None: the kernel cannot run)."""
    return next((b for b in (128, 64, 32, 16) if cache_len % b == 0), None)


def supported(cache_len: int, head_dim: int) -> bool:
    """Whether the kernels run for these slots and head size: Triton tiles are powers of two >= 16,
    and RoPE works on the two halves of a head."""
    return key_block(cache_len) is not None and head_dim >= 32 and head_dim & (head_dim - 1) == 0


def num_splits(blocks: int, programs_per_split: int) -> int:
    """How many parts the key blocks are split into: a divisor of `blocks` (each part reads whole
    blocks) that brings the grid nearest to `_TARGET_PROGRAMS` programs."""
    divisors = [n for n in range(1, blocks + 1) if blocks % n == 0]
    return min(divisors, key=lambda n: abs(n * programs_per_split - _TARGET_PROGRAMS))


def _halves(ref, rows, half: int, mask=None):
    """The two halves of the last axis of `ref` at `rows` (an index, a `pl.ds`, or None for a 1-D
    ref), in fp32."""
    from jax.experimental.pallas import triton as plgpu

    at = lambda cols: ref.at[cols] if rows is None else ref.at[rows, cols]
    masked = {} if mask is None else dict(mask=mask, other=0.0)  # Triton takes `other` only with a mask

    def load(cols):
        return plgpu.load(at(cols), **masked).astype(jnp.float32)

    return load(pl.ds(0, half)), load(pl.ds(half, half))


def _with_bias_and_rope(raw, bias, cos, sin, dtype):
    """(x + bias) rounded to the activation dtype, then rotated as `qwen2.apply_rope`:
    x * cos + rotate_half(x) * sin, with rotate_half([lo, hi]) = [-hi, lo]. Halves in, halves out."""
    lo, hi = (jnp.asarray(r + b).astype(dtype).astype(jnp.float32) for r, b in zip(raw, bias))
    return (lo * cos[0] - hi * sin[0]).astype(dtype), (hi * cos[1] + lo * sin[1]).astype(dtype)


def _new_token(qkv_ref, bq_ref, bk_ref, bv_ref, cos_ref, sin_ref, q_rows, q_mask, *, heads: int, kv: int,
               half: int, dtype):
    """This program's rotated queries (halves), and the rotated key (halves) and value of its KV head."""
    j = pl.program_id(1)
    cos, sin = _halves(cos_ref, None, half), _halves(sin_ref, None, half)
    q = _with_bias_and_rope(_halves(qkv_ref, q_rows, half, q_mask), _halves(bq_ref, q_rows, half, q_mask), cos, sin,
                            dtype)
    k = _with_bias_and_rope(_halves(qkv_ref, heads + j, half), _halves(bk_ref, j, half), cos, sin, dtype)
    v = (qkv_ref[heads + kv + j, :].astype(jnp.float32) + bv_ref[j, :].astype(jnp.float32)).astype(dtype)
    return q, k, v


def _kernel(qkv_ref, bq_ref, bk_ref, bv_ref, cos_ref, sin_ref, k_ref, v_ref, seg_ref, info_ref,
            o_ref, m_ref, l_ref, k_out_ref, v_out_ref, *, block: int, chunk: int, scale: float, rows: int, group: int,
            heads: int, kv: int):
    """One (row, KV head, split of the keys): the group's queries -> unnormalised o [R, d], max m [R]
    and sum l [R] over the split's keys before the query's slot. The split that holds the slot
    writes the new key and value there (the cache outputs alias the cache inputs); nothing here
    reads that slot: the combine adds the query's own key."""
    half = k_ref.shape[1] // 2
    start = pl.program_id(2) * chunk
    q_seg, q_slot = info_ref[0], info_ref[1]
    first = pl.program_id(1) * group
    q_mask = jax.lax.broadcasted_iota(jnp.int32, (rows, half), 0) < group
    q, k_new, v_new = _new_token(qkv_ref, bq_ref, bk_ref, bv_ref, cos_ref, sin_ref, pl.ds(first, rows), q_mask,
                                 heads=heads, kv=kv, half=half, dtype=k_ref.dtype)

    @pl.when((q_slot >= start) & (q_slot < start + chunk))
    def _():
        k_out_ref[q_slot - start, pl.ds(0, half)] = k_new[0]
        k_out_ref[q_slot - start, pl.ds(half, half)] = k_new[1]
        v_out_ref[q_slot - start, :] = v_new

    def attend(offset, seen, carry):
        o, m, l = carry
        keys = pl.ds(offset, block)
        s = (jnp.dot(q[0], k_ref[keys, pl.ds(0, half)].T, preferred_element_type=jnp.float32)
             + jnp.dot(q[1], k_ref[keys, pl.ds(half, half)].T, preferred_element_type=jnp.float32)) * scale
        s = jnp.where(seen, s, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.where(seen, jnp.exp(s - m_new[:, None]), 0.0)
        rescale = jnp.exp(m - m_new)
        v = v_ref[keys, :]
        o = o * rescale[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return o, m_new, l * rescale + jnp.sum(p, axis=1)

    def body(i, carry):
        offset = pl.multiple_of(i * block, block)
        seg = seg_ref[pl.ds(offset, block)]
        slot = start + offset + jax.lax.broadcasted_iota(jnp.int32, (block,), 0)
        seen = ((seg == q_seg) & (slot < q_slot)).astype(jnp.int32)
        # A block with no key of the query's segment (a shorter prompt's padding) is not read.
        return jax.lax.cond(jnp.max(seen) > 0, lambda c: attend(offset, seen[None, :] > 0, c), lambda c: c, carry)

    # Blocks that start at or after the query's slot hold no key for this kernel: not read.
    last = jnp.clip((q_slot - 1 - start) // block + 1, 0, chunk // block)
    init = (jnp.zeros((rows, 2 * half), jnp.float32), jnp.full((rows,), _NEG, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    o, m, l = jax.lax.fori_loop(0, last, body, init)
    o_ref[...] = o
    m_ref[...] = m
    l_ref[...] = l


def _combine_kernel(qkv_ref, bq_ref, bk_ref, bv_ref, cos_ref, sin_ref, o_ref, m_ref, l_ref, out_ref, *, splits: int,
                    group: int, scale: float, heads: int, kv: int):
    """One query head: its partial outputs of every split and its own new key, rescaled to their
    overall max and summed.

    o_ref [P, R, d], m_ref / l_ref [P, R]: P >= splits parts (a power of two; the ones after
    `splits` are not written and are masked), R the padded rows of the KV head's group.
    """
    from jax.experimental.pallas import triton as plgpu

    head = pl.program_id(2)
    row = pl.program_id(1) * group + head
    half = o_ref.shape[2] // 2
    q, k_new, v_new = _new_token(qkv_ref, bq_ref, bk_ref, bv_ref, cos_ref, sin_ref, row, None, heads=heads, kv=kv,
                                 half=half, dtype=out_ref.dtype)
    s_new = (jnp.sum(q[0].astype(jnp.float32) * k_new[0].astype(jnp.float32))
             + jnp.sum(q[1].astype(jnp.float32) * k_new[1].astype(jnp.float32))) * scale
    parts = jax.lax.broadcasted_iota(jnp.int32, (o_ref.shape[0],), 0) < splits
    m = plgpu.load(m_ref.at[:, head], mask=parts, other=_NEG)
    l = plgpu.load(l_ref.at[:, head], mask=parts, other=0.0)
    o = plgpu.load(o_ref.at[:, head, :], mask=parts[:, None], other=0.0)
    top = jnp.maximum(jnp.max(m), s_new)
    weight = jnp.exp(m - top)  # a split that saw no key has l = 0 and m = _NEG: weight 0
    p_new = jnp.exp(s_new - top)
    num = jnp.sum(o * weight[:, None], axis=0) + p_new.astype(v_new.dtype).astype(jnp.float32) * v_new.astype(
        jnp.float32)
    out_ref[row, :] = (num / (jnp.sum(l * weight) + p_new)).astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("layer", "interpret"))
def decode_attention(qkv, biases, cos, sin, k_cache, v_cache, q_seg, kv_seg, q_slot, *, layer: int,
                     interpret: bool = False):
    """One decode step's attention in layer `layer`, from the q/k/v projections to the heads' outputs.

    qkv [B, H + 2 KV, d]: the q, k and v projections of the new token without their biases (the
    query heads, then the key heads, then the value heads); biases (q [H, d], k [KV, d], v [KV, d]);
    cos / sin [B, d] of the token's position; k_cache / v_cache [L, B, S_max, KV, d], the whole
    cache, in the activation dtype; q_seg [B] and kv_seg [B, S] segment ids of the first
    S <= S_max slots (the ones attended); q_slot the token's cache slot, a scalar (the same for
    every row) -> (out [B, H, d], k_cache, v_cache with the new key (bias and RoPE applied) and value
    at `q_slot` of layer `layer`). Scores and softmax in fp32, probabilities cast to the values'
    dtype for their matmul (as the XLA path).
    """
    from jax.experimental.pallas import triton as plgpu

    b, _, d = qkv.shape
    s, kv = kv_seg.shape[1], k_cache.shape[3]
    h = qkv.shape[1] - 2 * kv
    if not supported(s, d) or s > k_cache.shape[2]:
        raise ValueError(f"decode_attention reads a multiple of 16 cache slots, at most the cache's "
                         f"{k_cache.shape[2]}, with a head size that is a power of two >= 32; got {s} slots "
                         f"of head size {d}")
    block = key_block(s)
    g = h // kv
    rows = max(_MIN_ROWS, 1 << (g - 1).bit_length())  # Triton tiles are powers of two
    splits = num_splits(s // block, b * kv)
    chunk = s // splits
    parts = 1 << (splits - 1).bit_length()  # the partials' leading axis, a power of two for the combine
    info = jnp.stack([q_seg.astype(jnp.int32), jnp.broadcast_to(jnp.asarray(q_slot, jnp.int32), (b,))], axis=1)
    statics = dict(heads=h, kv=kv, scale=d**-0.5, group=g)
    token_specs = [
        pl.BlockSpec((None, h + 2 * kv, d), lambda i, *_: (i, 0, 0)),  # qkv
        pl.BlockSpec((h, d), lambda *_: (0, 0)),
        pl.BlockSpec((kv, d), lambda *_: (0, 0)),
        pl.BlockSpec((kv, d), lambda *_: (0, 0)),
        pl.BlockSpec((None, d), lambda i, *_: (i, 0)),  # cos
        pl.BlockSpec((None, d), lambda i, *_: (i, 0)),  # sin
    ]
    token = (qkv, *biases, cos, sin)
    cache_spec = pl.BlockSpec((None, None, chunk, None, d), lambda i, j, n: (layer, i, n, j, 0))
    o, m, l, k_cache, v_cache = pl.pallas_call(
        functools.partial(_kernel, block=block, chunk=chunk, rows=rows, **statics),
        grid=(b, kv, splits),
        in_specs=[
            *token_specs,
            cache_spec,
            cache_spec,
            pl.BlockSpec((None, chunk), lambda i, j, n: (i, n)),
            pl.BlockSpec((None, 2), lambda i, j, n: (i, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, d), lambda i, j, n: (n, i, j, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda i, j, n: (n, i, j, 0)),
            pl.BlockSpec((None, None, None, rows), lambda i, j, n: (n, i, j, 0)),
            cache_spec,
            cache_spec,
        ],
        out_shape=[
            jax.ShapeDtypeStruct((parts, b, kv, rows, d), jnp.float32),
            jax.ShapeDtypeStruct((parts, b, kv, rows), jnp.float32),
            jax.ShapeDtypeStruct((parts, b, kv, rows), jnp.float32),
            jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
            jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype),
        ],
        input_output_aliases={6: 3, 7: 4},  # the cache, written in place at one slot
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="decode_attention",
    )(*token, k_cache, v_cache, kv_seg.astype(jnp.int32), info)
    out = pl.pallas_call(
        functools.partial(_combine_kernel, splits=splits, **statics),
        grid=(b, kv, g),  # one program per query head
        in_specs=[
            *token_specs,
            pl.BlockSpec((parts, None, None, rows, d), lambda i, j, r: (0, i, j, 0, 0)),
            pl.BlockSpec((parts, None, None, rows), lambda i, j, r: (0, i, j, 0)),
            pl.BlockSpec((parts, None, None, rows), lambda i, j, r: (0, i, j, 0)),
        ],
        out_specs=pl.BlockSpec((None, h, d), lambda i, *_: (i, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((b, h, d), k_cache.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1),
        interpret=interpret,
        name="decode_attention_combine",
    )(*token, o, m, l)
    return out, k_cache, v_cache
