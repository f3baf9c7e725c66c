"""One-token decode attention over the KV cache as one GPU kernel (Pallas on Triton).

The XLA path of a decode step attends in four kernels per layer: the scores matmul (fp32 scores
[B, KV, G, S] written to memory), the masked softmax, the probabilities-times-values matmul
(split over the keys) and its reduction. This kernel reads each key and value block once, keeps
the scores and the running softmax in registers (flash attention's online softmax) and writes
only a partial output per split of the keys; a second small kernel combines the splits, one
program per query head. q and the output keep the decoder's [B, H, d] layout (no pad or slice of
the query groups around the kernels).

Mask: the rule of :func:`manager_jax.models.attention.segment_causal_mask` for a single query at
cache slot `q_slot`: key slot s is seen when `kv_seg[b, s] == q_seg[b]` and `s <= q_slot`. Blocks
after `q_slot` are not read at all.

The kernel reads the layer's keys straight out of the whole cache [L, B, S, KV, d] (no slice is
copied); `layer` is static, as in the unrolled decode step. Off the GPU it runs in Pallas interpret
mode, which is how the tests check it against the XLA path.
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
    """Whether the kernel runs for these slots and head size (Triton tiles are powers of two >= 16)."""
    return key_block(cache_len) is not None and head_dim >= 16 and head_dim & (head_dim - 1) == 0


def num_splits(blocks: int, programs_per_split: int) -> int:
    """How many parts the key blocks are split into: a divisor of `blocks` (each part reads whole
    blocks) that brings the grid nearest to `_TARGET_PROGRAMS` programs."""
    divisors = [n for n in range(1, blocks + 1) if blocks % n == 0]
    return min(divisors, key=lambda n: abs(n * programs_per_split - _TARGET_PROGRAMS))


def _group_rows(rows: int, d: int, group: int):
    """The query heads of KV head `program_id(1)` in a [H, d] block: their rows (a tile of `rows`
    starting at the group's first head) and which of the tile's rows are the group's."""
    first = pl.program_id(1) * group
    return pl.ds(first, rows), jax.lax.broadcasted_iota(jnp.int32, (rows, d), 0) < group


def _kernel(q_ref, k_ref, v_ref, seg_ref, info_ref, o_ref, m_ref, l_ref, *, block: int, chunk: int, scale: float,
            rows: int, group: int):
    """One (row, KV head, split of the keys): the group's queries -> unnormalised o [R, d], max m [R]
    and sum l [R] over the split's keys."""
    from jax.experimental.pallas import triton as plgpu

    start = pl.program_id(2) * chunk
    q_seg, q_slot = info_ref[0], info_ref[1]
    heads, in_group = _group_rows(rows, q_ref.shape[1], group)
    q = plgpu.load(q_ref.at[heads, :], mask=in_group, other=0.0)

    def attend(offset, seen, carry):
        o, m, l = carry
        k = k_ref[pl.ds(offset, block), :]
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
        s = jnp.where(seen, s, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.where(seen, jnp.exp(s - m_new[:, None]), 0.0)
        rescale = jnp.exp(m - m_new)
        v = v_ref[pl.ds(offset, block), :]
        o = o * rescale[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return o, m_new, l * rescale + jnp.sum(p, axis=1)

    def body(i, carry):
        offset = pl.multiple_of(i * block, block)
        seg = seg_ref[pl.ds(offset, block)]
        slot = start + offset + jax.lax.broadcasted_iota(jnp.int32, (block,), 0)
        seen = ((seg == q_seg) & (slot <= q_slot)).astype(jnp.int32)
        # A block with no key of the query's segment (a shorter prompt's padding) is not read.
        return jax.lax.cond(jnp.max(seen) > 0, lambda c: attend(offset, seen[None, :] > 0, c), lambda c: c, carry)

    # Blocks that start after the query's slot hold no key it may see: not read.
    last = jnp.clip((q_slot - start) // block + 1, 0, chunk // block)
    init = (jnp.zeros((rows, q.shape[1]), jnp.float32), jnp.full((rows,), _NEG, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    o, m, l = jax.lax.fori_loop(0, last, body, init)
    o_ref[...] = o
    m_ref[...] = m
    l_ref[...] = l


def _combine_kernel(o_ref, m_ref, l_ref, out_ref, *, splits: int, group: int):
    """One query head: its partial outputs of every split rescaled to their overall max and summed.

    o_ref [P, R, d], m_ref / l_ref [P, R]: P >= splits parts (a power of two; the ones after
    `splits` are not written and are masked), R the padded rows of the KV head's group.
    """
    from jax.experimental.pallas import triton as plgpu

    head = pl.program_id(2)
    parts = jax.lax.broadcasted_iota(jnp.int32, (o_ref.shape[0],), 0) < splits
    m = plgpu.load(m_ref.at[:, head], mask=parts, other=_NEG)
    l = plgpu.load(l_ref.at[:, head], mask=parts, other=0.0)
    o = plgpu.load(o_ref.at[:, head, :], mask=parts[:, None], other=0.0)
    # A split that saw no key has l = 0 and m = _NEG: its weight is 0. The query's own key is
    # always seen, so the sum is > 0.
    weight = jnp.exp(m - jnp.max(m))
    out = jnp.sum(o * weight[:, None], axis=0) / jnp.sum(l * weight)
    out_ref[pl.program_id(1) * group + head, :] = out.astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("layer", "interpret"))
def decode_attention(q, k_cache, v_cache, q_seg, kv_seg, q_slot, *, layer: int, interpret: bool = False):
    """Attention of one new query per row over layer `layer` of the KV cache.

    q [B, H, d]; k_cache / v_cache [L, B, S_max, KV, d] (the whole cache); q_seg [B] and kv_seg
    [B, S] segment ids of the first S <= S_max slots (the ones attended); q_slot the query's cache
    slot, a scalar (the same for every row) -> [B, H, d] in q's dtype. Scores and softmax in fp32,
    probabilities cast to the values' dtype for their matmul (as the XLA path).
    """
    from jax.experimental.pallas import triton as plgpu

    b, h, d = q.shape
    s, kv = kv_seg.shape[1], k_cache.shape[3]
    if not supported(s, d) or s > k_cache.shape[2]:
        raise ValueError(f"decode_attention reads a multiple of 16 cache slots, at most the cache's "
                         f"{k_cache.shape[2]}, with a head size that is a power of two >= 16; got {s} slots "
                         f"of head size {d}")
    block = key_block(s)
    g = h // kv
    rows = max(_MIN_ROWS, 1 << (g - 1).bit_length())  # Triton tiles are powers of two
    splits = num_splits(s // block, b * kv)
    chunk = s // splits
    parts = 1 << (splits - 1).bit_length()  # the partials' leading axis, a power of two for the combine
    info = jnp.stack([q_seg.astype(jnp.int32), jnp.broadcast_to(jnp.asarray(q_slot, jnp.int32), (b,))], axis=1)
    kernel = functools.partial(_kernel, block=block, chunk=chunk, scale=d**-0.5, rows=rows, group=g)
    # q and the output stay [B, H, d]: each program reads and writes its group's rows (masked).
    heads_spec = pl.BlockSpec((None, h, d), lambda i, *_: (i, 0, 0))
    cache_spec = pl.BlockSpec((None, None, chunk, None, d), lambda i, j, n: (layer, i, n, j, 0))
    o, m, l = pl.pallas_call(
        kernel,
        grid=(b, kv, splits),
        in_specs=[
            heads_spec,
            cache_spec,
            cache_spec,
            pl.BlockSpec((None, chunk), lambda i, j, n: (i, n)),
            pl.BlockSpec((None, 2), lambda i, j, n: (i, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, d), lambda i, j, n: (n, i, j, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda i, j, n: (n, i, j, 0)),
            pl.BlockSpec((None, None, None, rows), lambda i, j, n: (n, i, j, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((parts, b, kv, rows, d), jnp.float32),
            jax.ShapeDtypeStruct((parts, b, kv, rows), jnp.float32),
            jax.ShapeDtypeStruct((parts, b, kv, rows), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="decode_attention",
    )(q, k_cache, v_cache, kv_seg.astype(jnp.int32), info)
    out = pl.pallas_call(
        functools.partial(_combine_kernel, splits=splits, group=g),
        grid=(b, kv, g),  # one program per query head
        in_specs=[
            pl.BlockSpec((parts, None, None, rows, d), lambda i, j, r: (0, i, j, 0, 0)),
            pl.BlockSpec((parts, None, None, rows), lambda i, j, r: (0, i, j, 0)),
            pl.BlockSpec((parts, None, None, rows), lambda i, j, r: (0, i, j, 0)),
        ],
        out_specs=heads_spec,
        out_shape=jax.ShapeDtypeStruct((b, h, d), q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1),
        interpret=interpret,
        name="decode_attention_combine",
    )(o, m, l)
    return out
