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
  query's own new key. With one split per (row, KV head) (a large batch, or `KernelConfig`'s
  programs at most rows x KV heads) there is no combine: the main kernel adds the own key and
  writes the heads' outputs.

Mask: the rule of :func:`manager_jax.models.attention.segment_causal_mask` for a single query at
cache slot `q_slot`: key slot s is seen when `kv_seg[b, s] == q_seg[b]` and `s <= q_slot`; the
query's own slot holds its own token, which it always sees. Blocks after the query's slot, and
blocks before the first key of the query's segment (a shorter prompt's left padding), are not
read.

The kernels read the layer's keys straight out of the whole cache [L, B, S, KV, d] (no slice is
copied); `layer` is static, as in the unrolled decode step. Off the GPU they run in Pallas
interpret mode, which is how the tests check them against the XLA path.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# Query heads of one KV head are padded to this many rows: Triton's matmuls need 16.
_MIN_ROWS = 16
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """How the main kernel divides the work (speed only: every choice gives the same result).

    block: key slots per loop step, the largest power of two <= this that divides the slots.
    programs: programs to aim for: each row's keys (from its segment's first block to the query's)
      are split evenly among programs / (rows x KV heads) programs, at most one per key block
      (264: two per streaming multiprocessor of an H100, so that the key reads keep the memory
      system busy at batch 1 as at batch 16).
    num_warps / num_stages: Triton's, for the main kernel (num_stages > 1 prefetches the next
      block's keys and values while the current one is used).
    peel: 1 loads each split's first key block before the queries are made, apart from the loop;
      0 streams every block through the loop. In the sm_90 code Triton makes of 1, that block's
      keys pass through shared memory (the transpose for q k^T) before its values are requested,
      and the loop's prefetch of the next blocks waits for that block's softmax: three memory
      round trips one after another before the loop runs. With 0 the queries' loads come first,
      then the loop's prologue requests the first num_stages - 1 blocks' keys and values at once:
      two. The same result either way.
    """

    block: int = 128
    programs: int = 264
    num_warps: int = 4
    num_stages: int = 3
    peel: int = 1

    @classmethod
    def default_for(cls, rows: int) -> "KernelConfig":
        """The config for `rows` rows decoded together when none is given: the fastest of
        benchmarks/decode_attention.py's sweep timed in a device loop (RESULTS.md, session 13, an
        H200). Two rows over a 4,224-slot cache: 128,528,4,2 at 8.2 us per layer against 9.1 for
        64,1056,4,3, the earlier default; 16 rows: 128,264,4,3 at 19.9 us, within 4% of the
        fastest (32,528,4,3 at 19.2)."""
        return cls(programs=528, num_stages=2) if rows <= 2 else cls()

    @classmethod
    def parse(cls, text: str) -> "KernelConfig":
        """"block,programs,num_warps,num_stages[,peel]", e.g. "64,528,4,3" or "128,264,4,3,0"."""
        try:
            fields = [int(x) for x in text.split(",")]
        except ValueError:
            fields = []
        if len(fields) not in (4, 5) or min(fields[:4]) < 1 or fields[4:] not in ([], [0], [1]):
            raise ValueError(f"a kernel config is four positive integers block,programs,num_warps,num_stages and "
                             f"optionally peel (0 or 1); got {text!r}")
        return cls(*fields)

    def __str__(self) -> str:
        return f"{self.block},{self.programs},{self.num_warps},{self.num_stages}" + ("" if self.peel else ",0")


def parse_kernel_configs(text: str) -> dict[int, KernelConfig]:
    """Configs by the rows decoded together: "ROWS:block,programs,warps,stages[,peel];..." (what
    benchmarks/decode_attention.py prints as the fastest), e.g. "2:128,132,4,2;16:64,528,4,3,0"."""
    configs = {}
    for item in filter(None, (x.strip() for x in text.split(";"))):
        rows, sep, config = item.partition(":")
        if not sep or not rows.strip().isdigit() or int(rows) < 1:
            raise ValueError(f"a kernel config by rows is ROWS:block,programs,num_warps,num_stages[,peel]; "
                             f"got {item!r}")
        configs[int(rows)] = KernelConfig.parse(config)
    return configs


def available() -> bool:
    """Whether this jax has Pallas's Triton backend (deprecated in jax 0.11, in favour of Mosaic GPU)."""
    try:
        from jax.experimental.pallas import triton  # noqa: F401
    except ImportError:
        return False
    return True


def key_block(cache_len: int, largest: int = 128) -> int | None:
    """The key block the kernel streams for a cache of this length (None: the kernel cannot run)."""
    sizes = [b for b in (256, 128, 64, 32, 16) if b <= largest]
    return next((b for b in sizes if cache_len % b == 0), None)


def supported(cache_len: int, head_dim: int) -> bool:
    """Whether the kernels run for these slots and head size: Triton tiles are powers of two >= 16."""
    return key_block(cache_len) is not None and head_dim >= 32 and head_dim & (head_dim - 1) == 0


def num_splits(blocks: int, programs_per_split: int, programs: int = KernelConfig.programs) -> int:
    """How many parts each row's keys are split into: the number that brings the grid nearest to
    `programs` programs, at most one part per key block."""
    return max(1, min(blocks, round(programs / programs_per_split)))


def _load(ref_at, mask=None):
    """A Triton load in fp32 (`other` only goes with a mask)."""
    from jax.experimental.pallas import triton as plgpu

    masked = {} if mask is None else dict(mask=mask, other=0.0)
    return plgpu.load(ref_at, **masked).astype(jnp.float32)


def _with_bias_and_rope(ref, bias_ref, rows, bias_rows, cols, partner, cos, sin, dtype, mask=None):
    """(x + bias) rounded to the activation dtype, then rotated as `qwen2.apply_rope`:
    x * cos + rotate_half(x) * sin, where rotate_half(x)[c] is -x[c + d/2] in the first half and
    x[c - d/2] in the second. `partner` holds those columns (an index array): the rotation is read
    from memory, a second load of the same row, since Triton cannot slice a value."""
    x = (_load(ref.at[rows, cols], mask) + _load(bias_ref.at[bias_rows, cols], mask)).astype(dtype)
    xp = (_load(ref.at[rows, partner], mask) + _load(bias_ref.at[bias_rows, partner], mask)).astype(dtype)
    sign = jnp.where(cols < ref.shape[-1] // 2, -1.0, 1.0)
    return (x.astype(jnp.float32) * cos + (sign * xp.astype(jnp.float32)) * sin).astype(dtype)


def _new_key_and_value(qkv_ref, bk_ref, bv_ref, cols, partner, cos, sin, *, heads: int, kv: int, dtype):
    """The rotated new key [d] and the value [d] of this program's KV head."""
    j = pl.program_id(1)
    k = _with_bias_and_rope(qkv_ref, bk_ref, heads + j, j, cols, partner, cos, sin, dtype)
    v = (qkv_ref[heads + kv + j, :].astype(jnp.float32) + bv_ref[j, :].astype(jnp.float32)).astype(dtype)
    return k, v


def _kernel(qkv_ref, bq_ref, bk_ref, bv_ref, cos_ref, sin_ref, k_ref, v_ref, seg_ref, info_ref, *out_refs,
            block: int, blocks: int, splits: int, scale: float, rows: int, group: int, heads: int, kv: int,
            peel: bool):
    """One (row, KV head, split of the row's keys): the group's queries -> unnormalised o [R, d],
    max m [R] and sum l [R] over the split's keys before the query's slot. The first split writes
    the new key and value at the query's slot (the cache outputs alias the cache inputs); nothing
    here reads that slot: the combine adds the query's own key. With one split there is no
    combine: the program adds the own key and writes the heads' outputs.

    out_refs: (o_ref, m_ref, l_ref, k_out_ref, v_out_ref), or with one split (out_ref [H, d] of
    the row, k_out_ref, v_out_ref).

    k_ref / v_ref [S_max, d] are the layer's whole cache row for this KV head; `blocks` key blocks
    of its first slots are the ones attended."""
    d = k_ref.shape[1]
    q_seg, q_slot, seg_start = info_ref[0], info_ref[1], info_ref[2]
    # The row's keys: from the block holding its segment's first key (before it: a shorter prompt's
    # left padding) to the one holding the key before the query. They are divided at run time, so
    # every split of every row gets an even share whatever the row's padding and position.
    row_first = jnp.clip(seg_start // block, 0, blocks)
    row_last = jnp.clip((q_slot + block - 1) // block, row_first, blocks)
    share = (row_last - row_first + splits - 1) // splits
    first = jnp.minimum(row_first + pl.program_id(2) * share, row_last)
    last = jnp.minimum(first + share, row_last)

    def load(i):
        offset = pl.multiple_of(jnp.clip(i, 0, blocks - 1) * block, block)
        keys = pl.ds(offset, block)
        return offset, k_ref[keys, :], v_ref[keys, :], seg_ref[keys]

    # peel: the first block is requested before the queries are made (`KernelConfig.peel`).
    first_block = load(first) if peel else None

    cos, sin = cos_ref[...].astype(jnp.float32), sin_ref[...].astype(jnp.float32)
    cols = jax.lax.broadcasted_iota(jnp.int32, (d,), 0)
    partner = (cols + d // 2) % d
    row = pl.program_id(1) * group + jax.lax.broadcasted_iota(jnp.int32, (rows, d), 0)
    in_group = jax.lax.broadcasted_iota(jnp.int32, (rows, d), 0) < group
    q = _with_bias_and_rope(qkv_ref, bq_ref, row, row, jnp.broadcast_to(cols, (rows, d)),
                            jnp.broadcast_to(partner, (rows, d)), cos, sin, k_ref.dtype, in_group)
    k_new, v_new = _new_key_and_value(qkv_ref, bk_ref, bv_ref, cols, partner, cos, sin, heads=heads, kv=kv,
                                      dtype=k_ref.dtype)
    k_out_ref, v_out_ref = out_refs[-2:]

    def write_new_key_and_value():
        @pl.when((pl.program_id(2) == 0) & (q_slot < k_out_ref.shape[0]))  # never a write past the cache
        def _():
            k_out_ref[q_slot, :] = k_new
            v_out_ref[q_slot, :] = v_new

    # Without peel the write comes after the loop, which then starts right after the queries are
    # made. The key at the query's slot is never attended here (masked; the combine adds it).
    if peel:
        write_new_key_and_value()

    def attend(loaded, carry, live=True):
        """Online softmax over one block; `live` False: the block is only masked (a no-op)."""
        offset, k, v, seg = loaded
        o, m, l = carry
        slot = offset + jax.lax.broadcasted_iota(jnp.int32, (block,), 0)
        seen = ((seg == q_seg) & (slot < q_slot) & live)[None, :]
        s = jnp.where(seen, jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.where(seen, jnp.exp(s - m_new[:, None]), 0.0)
        rescale = jnp.exp(m - m_new)
        o = o * rescale[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return o, m_new, l * rescale + jnp.sum(p, axis=1)

    init = (jnp.zeros((rows, d), jnp.float32), jnp.full((rows,), _NEG, jnp.float32), jnp.zeros((rows,), jnp.float32))
    carry = attend(first_block, init, first < last) if peel else init
    # The (rest of the) blocks in a plain loop, which Triton pipelines (num_stages).
    o, m, l = jax.lax.fori_loop(first + int(peel), last, lambda i, c: attend(load(i), c), carry)
    if not peel:
        write_new_key_and_value()
    if splits == 1:
        from jax.experimental.pallas import triton as plgpu

        out_ref = out_refs[0]
        out = _with_own_key(o, m, l, q, k_new, v_new, scale)
        plgpu.store(out_ref.at[row, jnp.broadcast_to(cols, (rows, d))], out.astype(out_ref.dtype), mask=in_group)
    else:
        o_ref, m_ref, l_ref = out_refs[:3]
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
    d = o_ref.shape[2]
    cos, sin = cos_ref[...].astype(jnp.float32), sin_ref[...].astype(jnp.float32)
    cols = jax.lax.broadcasted_iota(jnp.int32, (d,), 0)
    partner = (cols + d // 2) % d
    q = _with_bias_and_rope(qkv_ref, bq_ref, row, row, cols, partner, cos, sin, out_ref.dtype)
    k_new, v_new = _new_key_and_value(qkv_ref, bk_ref, bv_ref, cols, partner, cos, sin, heads=heads, kv=kv,
                                      dtype=out_ref.dtype)
    parts = jax.lax.broadcasted_iota(jnp.int32, (o_ref.shape[0],), 0) < splits
    m = plgpu.load(m_ref.at[:, head], mask=parts, other=_NEG)
    l = plgpu.load(l_ref.at[:, head], mask=parts, other=0.0)
    o = plgpu.load(o_ref.at[:, head, :], mask=parts[:, None], other=0.0)
    # The splits, rescaled to their overall max (a split that saw no key has l = 0), then the own key.
    top = jnp.max(m, keepdims=True)
    weight = jnp.exp(m - top)
    o, l = jnp.sum(o * weight[:, None], axis=0, keepdims=True), jnp.sum(l * weight, keepdims=True)
    out_ref[row, :] = _with_own_key(o, top, l, q[None], k_new, v_new, scale)[0].astype(out_ref.dtype)


def _with_own_key(o, m, l, q, k_new, v_new, scale: float):
    """Attention outputs [R, d] from the partial results over the cache (o [R, d] unnormalised, its
    max m [R] and sum l [R]) and each query's own new key and value: the query's score, then all
    rescaled to their max. A query that saw no key in the cache (l = 0, m = _NEG) gets its value."""
    s_new = jnp.sum(q.astype(jnp.float32) * k_new.astype(jnp.float32)[None, :], axis=1) * scale
    top = jnp.maximum(m, s_new)
    weight, p_new = jnp.exp(m - top), jnp.exp(s_new - top)
    num = o * weight[:, None] + p_new.astype(v_new.dtype).astype(jnp.float32)[:, None] * v_new.astype(jnp.float32)
    return num / (l * weight + p_new)[:, None]


@functools.partial(jax.jit, static_argnames=("layer", "interpret", "config"))
def decode_attention(qkv, biases, cos, sin, k_cache, v_cache, q_seg, kv_seg, q_slot, *, layer: int,
                     interpret: bool = False, config: KernelConfig = KernelConfig()):
    """One decode step's attention in layer `layer`, from the q/k/v projections to the heads' outputs.

    qkv [B, H + 2 KV, d]: the q, k and v projections of the new token without their biases (the
    query heads, then the key heads, then the value heads); biases (q [H, d], k [KV, d], v [KV, d]);
    cos / sin [B, d] of the token's position; k_cache / v_cache [L, B, S_max, KV, d], the whole
    cache, in the activation dtype; q_seg [B] and kv_seg [B, S] segment ids of the first
    S <= S_max slots (the ones attended); q_slot the token's cache slot, a scalar (the same for
    every row) -> (out [B, H, d], k_cache, v_cache with the new key (bias and RoPE applied) and value
    at `q_slot` of layer `layer`). Scores and softmax in fp32, probabilities cast to the values'
    dtype for their matmul (as the XLA path). `config` divides the work (speed only).
    """
    from jax.experimental.pallas import triton as plgpu

    b, _, d = qkv.shape
    s, kv = kv_seg.shape[1], k_cache.shape[3]
    h = qkv.shape[1] - 2 * kv
    if not supported(s, d) or s > k_cache.shape[2]:
        raise ValueError(f"decode_attention reads a multiple of 16 cache slots, at most the cache's "
                         f"{k_cache.shape[2]}, with a head size that is a power of two >= 32; got {s} slots "
                         f"of head size {d}")
    block = key_block(s, config.block)
    g = h // kv
    rows = max(_MIN_ROWS, 1 << (g - 1).bit_length())  # Triton tiles are powers of two
    splits = num_splits(s // block, b * kv, config.programs)
    parts = 1 << (splits - 1).bit_length()  # the partials' leading axis, a power of two for the combine
    # Per row: the query's segment, its slot, the first slot of its segment (0 if none is), and a
    # zero (Triton blocks are powers of two).
    seg_start = jnp.argmax(kv_seg == q_seg[:, None], axis=1).astype(jnp.int32)
    info = jnp.stack([q_seg.astype(jnp.int32), jnp.broadcast_to(jnp.asarray(q_slot, jnp.int32), (b,)), seg_start,
                      jnp.zeros((b,), jnp.int32)], axis=1)
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
    # The layer's whole cache row per (row, KV head): each split finds its keys at run time.
    cache_spec = pl.BlockSpec((None, None, k_cache.shape[2], None, d), lambda i, j, n: (layer, i, 0, j, 0))
    main = functools.partial(
        pl.pallas_call,
        functools.partial(_kernel, block=block, blocks=s // block, splits=splits, rows=rows, peel=bool(config.peel),
                          **statics),
        grid=(b, kv, splits),
        in_specs=[
            *token_specs,
            cache_spec,
            cache_spec,
            pl.BlockSpec((None, s), lambda i, j, n: (i, 0)),
            pl.BlockSpec((None, 4), lambda i, j, n: (i, 0)),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="decode_attention",
    )
    cache_out = [jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype), jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)]
    if splits == 1:  # the programs add the own key themselves: no partials, no combine
        return tuple(main(
            out_specs=[pl.BlockSpec((None, h, d), lambda i, *_: (i, 0, 0)), cache_spec, cache_spec],
            out_shape=[jax.ShapeDtypeStruct((b, h, d), k_cache.dtype), *cache_out],
            input_output_aliases={6: 1, 7: 2},  # the cache, written in place at one slot
        )(*token, k_cache, v_cache, kv_seg.astype(jnp.int32), info))
    o, m, l, k_cache, v_cache = main(
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
            *cache_out,
        ],
        input_output_aliases={6: 3, 7: 4},  # the cache, written in place at one slot
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


def decode_attention_on_mesh(q, k, v, biases, cos, sin, k_cache, v_cache, q_seg, kv_seg, q_slot, *, layer: int,
                             mesh, row_axes=None, head_axis: str | None = None, interpret: bool = False,
                             config: KernelConfig = KernelConfig()):
    """`decode_attention` on a mesh: each device runs the kernels on its own rows and KV heads
    (a shard_map), where the engine keeps them: the rows split over `row_axes`, the heads (query
    heads and their KV head together) over `head_axis`. An axis that does not divide the rows or
    the heads is not split (those are replicated, as the engine's cache then is).

    q [B, H, d], k / v [B, KV, d]: the projections without their biases, given apart (on a mesh
    their head axes are split separately; each device joins its own); the rest as in
    `decode_attention`. -> (out [B, H, d], k_cache, v_cache).
    """
    from jax.sharding import PartitionSpec as P

    b, h, kv = q.shape[0], q.shape[1], k.shape[1]
    rows = tuple(a for a in (row_axes or ()) if mesh.shape.get(a, 1) > 1) or None
    if rows is not None and b % math.prod(mesh.shape[a] for a in rows):
        rows = None
    heads = head_axis if mesh.shape.get(head_axis, 1) > 1 else None
    if heads is not None and (h % mesh.shape[heads] or kv % mesh.shape[heads]):
        heads = None

    def local(q, k, v, bq, bk, bv, cos, sin, k_cache, v_cache, q_seg, kv_seg, q_slot):
        return decode_attention(jnp.concatenate([q, k, v], axis=1), (bq, bk, bv), cos, sin, k_cache, v_cache, q_seg,
                                kv_seg, q_slot, layer=layer, interpret=interpret, config=config)

    token, bias, row = P(rows, heads, None), P(heads, None), P(rows, None)
    cache = P(None, rows, None, heads, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(token, token, token, bias, bias, bias, row, row, cache, cache,
                                                    P(rows), row, P()),
                         out_specs=(token, cache, cache), check_vma=False)(
        q, k, v, *biases, cos, sin, k_cache, v_cache, q_seg, kv_seg, jnp.asarray(q_slot, jnp.int32))
