"""Attention dispatch: one entry point for every attention in the model.

`xla` is the reference path (any backend, arbitrary masks, fp32 softmax as the PyTorch eager code).
`cudnn` uses `jax.nn.dot_product_attention(implementation="cudnn")` (GPU flash attention) on rows padded
to a multiple of 64; it is taken only where the mask is plain causal (one right-padded sample per
row) or absent (the vision tower), and `auto` picks it on GPU for those cases.
`splash` is the TPU Splash kernel (Pallas) for fresh self-attention: causal for the text model's
training rows (packed segments) and inference prefill / scoring, unmasked for the vision tower's
crops (padded to 768 tokens, the padding kept apart by segment ids); GQA, no [T, S] scores in
memory. It runs inside :func:`sharded_attention` (the train step and the inference engine enter it
with their mesh), on rows whose length is a multiple of 128; `auto` picks it when that mesh is
made of TPUs. Elsewhere the XLA / cuDNN paths run, except in one-token decode steps on a GPU, which may
use the fused kernels of `decode_attention.py` (the inference engine's `decode_attention`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh, PartitionSpec as P

from manager_jax.models.layers import ATTENTION_IO, is_16bit, round_to
from manager_jax.platform import target_platform

NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)
# The XLA path handles queries in blocks of this many positions (rematerialised), so its fp32 scores
# are [block, S] rather than [S, S]: 16k-token training rows fit without a fused kernel.
QUERY_BLOCK = 2048
# Row lengths for the cuDNN flash kernels are padded to a multiple of this (see padded_flash_attention).
FLASH_SEQ_MULTIPLE = 64


@dataclasses.dataclass(frozen=True)
class AttentionMesh:
    """Where the training pass runs: its mesh and the mesh axis that splits heads. The train step
    vmaps the model over batch shards with ``spmd_axis_name`` = the batch axes, so a shard_map
    inside keeps each shard on its devices."""

    mesh: Mesh
    head_axis: str | None = "tensor"
    # Mesh axes the rows (the batch axis of q/k/v) are split over: None inside the train step,
    # whose shard vmap carries the data split; the inference engine's batch axes otherwise.
    row_axes: tuple[str, ...] | None = None

    @property
    def platform(self) -> str:
        return self.mesh.devices.flat[0].platform

    @property
    def interpret(self) -> bool:
        # On CPU an explicit attention_impl="splash" runs the kernel in Pallas interpret mode
        # (slow, exact: for tests of the TPU path without a TPU).
        return self.platform == "cpu"


_ATTENTION_MESH: contextvars.ContextVar[AttentionMesh | None] = contextvars.ContextVar("attention_mesh", default=None)


@contextlib.contextmanager
def sharded_attention(where: AttentionMesh) -> Iterator[None]:
    """Lets the packed training attention use the Splash kernel on `where` (see the module doc), and
    the fused decode kernels (models/decode_attention.py) run per device on its mesh."""
    token = _ATTENTION_MESH.set(where)
    try:
        yield
    finally:
        _ATTENTION_MESH.reset(token)


def current_attention_mesh() -> AttentionMesh | None:
    """The mesh set by the innermost `sharded_attention`, if any (the fused kernels' shard_maps)."""
    return _ATTENTION_MESH.get()


def split_width_over_heads_axis(x: jax.Array) -> jax.Array:
    """`x` [..., D] constrained to have its last dimension split over the mesh's head axis.

    For activations kept whole only because GSPMD propagates the replicated residual stream into
    them, such as the Manager's multi-layer features ([N, T, D], 13 layers): at 72B (tensor 8) each
    copy is 3.25 GiB per chip whole and 0.4 GiB split. A no-op outside `sharded_attention`, on a
    mesh without that axis, or where it does not divide D. The other dimensions stay free.
    """
    where = _ATTENTION_MESH.get()
    if where is None or where.head_axis is None:
        return x
    n = where.mesh.shape.get(where.head_axis, 1)
    if n == 1 or x.shape[-1] % n:
        return x
    spec = P(*([P.UNCONSTRAINED] * (x.ndim - 1)), where.head_axis)
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(where.mesh, spec))


SPLASH_LANES = 128  # Splash tiles the sequence in blocks that are multiples of 128


def splash_applies(impl: str, seq_len: int) -> bool:
    """Whether a packed causal self-attention over rows of `seq_len` runs on the Splash kernel."""
    where = _ATTENTION_MESH.get()
    if where is None or impl not in ("splash", "auto"):
        return False  # outside the training pass "splash" means the XLA path
    if where.platform != "tpu":
        if impl == "auto":
            return False
        if not where.interpret:
            raise ValueError(f"attention_impl='splash' is a TPU kernel; this mesh is {where.platform}")
    if seq_len % SPLASH_LANES:
        if impl == "splash":
            raise ValueError(f"attention_impl='splash' needs rows of a multiple of {SPLASH_LANES} tokens, got {seq_len}")
        return False
    return True


@functools.lru_cache(maxsize=32)
def _splash_kernel(groups: int, seq_len: int, interpret: bool, causal: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    block = next(b for b in (512, 256, 128) if seq_len % b == 0)
    sizes = sk.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block, block_kv_dkv=block,
        block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block,
    )
    shape = sm.CausalMask if causal else sm.FullMask
    mask = sm.MultiHeadMask([shape((seq_len, seq_len)) for _ in range(groups)])
    # One MQA kernel per KV head: the G query heads of a group share its keys and values. Its
    # block-mask tables are built concretely (not as tracers of the step being traced), so the
    # cached kernel can serve every later trace.
    with jax.ensure_compile_time_eval():
        return sk.make_splash_mqa_single_device(mask=mask, block_sizes=sizes, interpret=interpret)


def _splash_local(q, k, v, segment_ids, interpret: bool, causal: bool):
    """Splash on this device's rows: q [B, T, H, d], k/v [B, T, KV, d], segment_ids [B, T]."""
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    b, t, h, d = q.shape
    kv = k.shape[2]
    kernel = _splash_kernel(h // kv, t, interpret, causal)
    q = (q * d**-0.5).reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4)  # [B, KV, G, T, d]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, T, d]

    def row(q_row, k_row, v_row, seg):
        ids = SegmentIds(q=seg, kv=seg)
        return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=ids))(q_row, k_row, v_row)

    out = jax.vmap(row)(q, k, v, segment_ids)  # [B, KV, G, T, d]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, causal: bool = True) -> jax.Array:
    """Attention within segments, causal or not (packed rows; segment 0 = padding attends to padding).

    q [B, T, H, d], k/v [B, T, KV, d] -> [B, T, H, d]. On a mesh it is a shard_map: the rows'
    shard axis (vmapped by the train step with ``spmd_axis_name``) and the heads stay where they
    are, so the kernel never moves activations between devices.
    """
    where = _ATTENTION_MESH.get()
    local = functools.partial(_splash_local, interpret=where.interpret, causal=causal)
    mesh = where.mesh
    if mesh.size == 1:
        return local(q, k, v, segment_ids)
    heads = where.head_axis if where.head_axis in mesh.shape else None
    if heads is not None and (q.shape[2] % mesh.shape[heads] or k.shape[2] % mesh.shape[heads]):
        heads = None  # heads that do not divide the axis are replicated, as the q/k/v weights are
    rows = where.row_axes or None
    if rows is not None and q.shape[0] % math.prod(mesh.shape[a] for a in rows):
        rows = None
    qkv = P(rows, None, heads)
    return jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, P(rows)), out_specs=qkv, check_vma=False)(
        q, k, v, segment_ids
    )


def segment_causal_mask(
    q_slot: jax.Array, kv_slot: jax.Array, q_seg: jax.Array, kv_seg: jax.Array, causal: bool = True
) -> jax.Array:
    """Boolean mask [B, 1, T, S]: same segment and (if causal) key slot <= query slot.

    Slots are positions in the physical sequence / KV cache (not RoPE positions), so packed rows and
    left-padded caches use the same rule. Padding (segment 0) attends to padding, which keeps every
    softmax row non-empty.
    """
    mask = q_seg[:, :, None] == kv_seg[:, None, :]
    if causal:
        mask = mask & (kv_slot[None, None, :] <= q_slot[None, :, None])
    return mask[:, None]


def _xla_attention(q, k, v, mask, scale, eager_logits: bool = False):
    """Reference attention with fp32 softmax; GQA groups folded into the query axis.

    The scores stay fp32 (as PyTorch's SDPA / flash kernels keep them). `eager_logits`: rounded to
    the compute dtype like PyTorch's eager attention, `(q @ k^T) * scale` (the matmul output, then
    the scaled value) before the fp32 softmax: what the original SigLIP class computes in bf16 / fp16.

    [B, KV, G*T, d] x [B, KV, S, d] keeps every einsum a plain batched matmul (the 5-D
    [B, T, KV, G, d] form was about 3x slower on CPU).
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    g = h // kv
    q = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, d)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, S, d]
    logits = jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=jnp.float32)
    if eager_logits:
        logits = round_to(round_to(logits, q.dtype) * scale, q.dtype)
    else:
        logits = logits * scale
    if mask is not None:
        s = k.shape[2]
        m = mask.reshape(b, kv, g, t, s) if mask.shape[1] == h else mask[:, :, None]  # [B, KV|1, G|1, T, S]
        logits = jnp.where(m, logits.reshape(b, kv, g, t, s), NEG_INF).reshape(b, kv, g * t, s)
    if eager_logits or not is_16bit(v.dtype):
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkqs,bksd->bkqd", probs, v, preferred_element_type=jnp.float32)
    else:
        # As the flash kernels (PyTorch's SDPA, flash_attention_2, cuDNN): the unnormalised
        # exp(s - max) rounded to the 16-bit dtype for the matmul with v, the fp32 row sum
        # divided out of the fp32 result.
        e = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
        out = jnp.einsum("bkqs,bksd->bkqd", e.astype(v.dtype), v, preferred_element_type=jnp.float32)
        out = out / jnp.sum(e, axis=-1, keepdims=True)
    return out.reshape(b, kv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None,
    impl: str = "auto",
    plain_causal: bool = False,
    valid_len: int | None = None,
    eager_logits: bool = False,
) -> jax.Array:
    """q [B,T,H,d], k/v [B,S,KV,d] (GQA when KV < H) -> [B,T,H,d].

    `eager_logits`: on the XLA path, round the scores as PyTorch's eager attention does (see
    `_xla_attention`; the vision tower, whose original class is eager-only). The cuDNN and Splash
    kernels keep their scores in fp32 whatever this says.

    `plain_causal=True` promises the caller's mask is exactly causal (single segment, no padding
    inside the row), which lets the cuDNN kernel run without an explicit mask. `valid_len` (with
    no mask): only the first `valid_len` positions are real, the rest is the caller's padding: it
    is masked as keys, its output rows are zero and no gradient reaches it, whatever a kernel
    leaves in padding rows (a NaN there would reach real rows through 0 * NaN, or the weights
    through the projections' gradients).
    """
    full = mask is None and not plain_causal  # no mask at all: every query sees every key
    # Named for remat "dots_acts", which keeps them (models/layers.py); a no-op otherwise.
    named = lambda *xs: tuple(checkpoint_name(x, ATTENTION_IO) for x in xs)
    if valid_len is None or valid_len >= max(q.shape[1], k.shape[1]):
        return _attend(*named(q, k, v), mask, impl, plain_causal, None, eager_logits)
    if not full:
        raise ValueError("valid_len is for unmasked attention only")
    real = lambda x: jnp.where((jnp.arange(x.shape[1]) < valid_len)[:, None, None], x, jnp.zeros((), x.dtype))
    return named(real(_attend(*named(real(q), real(k), real(v)), None, impl, False, valid_len, eager_logits)))[0]


def _attend(q, k, v, mask, impl: str, plain_causal: bool, valid_len: int | None,
            eager_logits: bool = False) -> jax.Array:
    scale = q.shape[-1] ** -0.5
    full = mask is None and not plain_causal
    t, s = q.shape[1], k.shape[1]
    if full and t == s and t % SPLASH_LANES == 0 and splash_applies(impl, t):
        # Unmasked self-attention (the vision tower's crops): real positions are segment 1, the
        # caller's padding segment 0, so neither attends to the other.
        segment_ids = jnp.broadcast_to((jnp.arange(t) < (valid_len or t)).astype(jnp.int32), q.shape[:2])
        return splash_attention(q, k, v, segment_ids, causal=False)
    if resolve_impl(impl, (plain_causal or full) and cudnn_takes(q.dtype, q.shape[-1])) == "cudnn":
        if not (plain_causal or full):
            raise ValueError("attention_impl='cudnn' supports causal (unpacked) or unmasked attention only")
        q, k, v = _whole_heads_unless_split_evenly(q, k, v)
        out = padded_flash_attention(q, k, v, scale=scale, causal=plain_causal, implementation="cudnn",
                                     valid_len=valid_len)
        return _whole_heads_unless_split_evenly(out, k)[0]
    if mask is None and plain_causal:
        mask = (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None] + (s - t))[None, None]
    if valid_len is not None and valid_len < s:
        mask = jnp.broadcast_to(jnp.arange(s) < valid_len, (1, 1, t, s))
    return _blocked_attention(q, k, v, mask, scale, QUERY_BLOCK, eager_logits)


def cudnn_takes(dtype, head_dim: int) -> bool:
    """Whether cuDNN's flash kernels take these inputs: 16-bit floats (not fp32: the parity tests
    and the CPU demo recipe) and head dimensions that are multiples of 8 up to 128."""
    return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and head_dim % 8 == 0 \
        and head_dim <= 128


def _whole_heads_unless_split_evenly(q, k, *more):
    """q, k, ... [B, T, heads, d] with their heads whole on each device when the mesh's head axis
    does not divide both head counts (0.5B's 14 and 2 heads on tensor 4). GSPMD splits such
    dimensions unevenly or in part; cuDNN's partitioner refuses that and the program does not
    compile. For the kernel's inputs and its output (which the o projection would split)."""
    where = _ATTENTION_MESH.get()
    n = where.mesh.shape.get(where.head_axis, 1) if where is not None and where.head_axis else 1
    if n == 1 or (q.shape[2] % n == 0 and k.shape[2] % n == 0):
        return (q, k, *more)
    # Rows stay split over the row axes (the engine's; in the train step the shard vmap adds them),
    # everything else whole: a layout cuDNN's partitioner can read back as a mesh spec.
    rows = where.row_axes
    if rows and q.shape[0] % math.prod(where.mesh.shape[a] for a in rows):
        rows = None
    whole = jax.sharding.NamedSharding(where.mesh, P(rows, None, None, None))
    return tuple(jax.lax.with_sharding_constraint(x, whole) for x in (q, k, *more))


def resolve_impl(impl: str, cudnn_expressible: bool) -> str:
    """The path `impl` takes for an attention the cuDNN kernel can express (causal or unmasked, and
    inputs it takes: `cudnn_takes`) or not: "auto" is cuDNN on GPU where it can be, XLA elsewhere."""
    if impl == "auto":
        return "cudnn" if (target_platform() == "gpu" and cudnn_expressible) else "xla"
    return impl


def unmasked_row_multiple(impl: str, dtype=jnp.bfloat16, head_dim: int = 64) -> int:
    """The row length that unmasked attention under `impl` (on inputs of `dtype` and `head_dim`)
    needs for its fused kernel: a caller that pads its rows to a multiple of this once (the vision
    tower, all its layers) saves the per-layer padding of `padded_flash_attention` (cuDNN: 64) or
    gets the Splash kernel at all (TPU: 128; rows of another length take the XLA path)."""
    if resolve_impl(impl, cudnn_takes(dtype, head_dim)) == "cudnn":
        return FLASH_SEQ_MULTIPLE
    return splash_row_multiple(impl)


def splash_row_multiple(impl: str) -> int:
    """The row length a fresh self-attention under `impl` needs to run on the Splash kernel inside
    the current `sharded_attention` (128), or 1 where Splash does not run: a caller choosing its
    own lengths (the inference engine's prompt buckets) rounds them up to it."""
    return SPLASH_LANES if splash_applies(impl, SPLASH_LANES) else 1


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def padded_flash_attention(q, k, v, *, scale: float, causal: bool, implementation: str | None = "cudnn",
                           valid_len: int | None = None):
    """`jax.nn.dot_product_attention` on rows padded to a multiple of FLASH_SEQ_MULTIPLE.

    cuDNN's flash kernels refuse some lengths in training (a 4,099-token row: "Unsupported
    sequence length"). Causal: padding keys sit after every real query, so no real query sees
    them. Unmasked: the true lengths go in as sequence lengths, so the padding keys are masked;
    `valid_len` says that the rows come padded already and only their first `valid_len` positions
    are real. The padded query rows are dropped. `implementation=None` runs the same call through
    XLA, which is how the padding is tested off the GPU.
    """
    t, s = q.shape[1], k.shape[1]
    if causal and (t != s or valid_len is not None):
        raise ValueError(f"padded causal flash attention needs fresh unpadded rows (queries == keys), got {t} vs {s}")
    tp, sp = _round_up(t, FLASH_SEQ_MULTIPLE), _round_up(s, FLASH_SEQ_MULTIPLE)
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0))) if n != x.shape[1] else x
    lengths = {}
    real_t, real_s = (t, s) if valid_len is None else (min(valid_len, t), min(valid_len, s))
    if not causal and (tp, sp) != (real_t, real_s):
        # Made from q, so that under vmap (the train step's shards) they carry the batch dimension
        # with q: jax's cuDNN batching rule reshapes them to the vmapped batch and fails on constants.
        rows = jax.lax.stop_gradient(q[:, 0, 0, 0]).astype(jnp.int32) * 0  # zeros that depend on q
        lengths = dict(query_seq_lengths=rows + real_t, key_value_seq_lengths=rows + real_s)
    out = jax.nn.dot_product_attention(
        pad(q, tp), pad(k, sp), pad(v, sp), scale=scale, is_causal=causal, implementation=implementation, **lengths
    )
    return out[:, :t]


def _blocked_attention(q, k, v, mask, scale, block, eager_logits: bool = False):
    """`_xla_attention` over query blocks (exact: every block sees all keys), rematerialised."""
    b, t, h, d = q.shape
    if t <= block:
        return _xla_attention(q, k, v, mask, scale, eager_logits)
    n = -(-t // block)
    pad = n * block - t
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, n, block, h, d).swapaxes(0, 1)
    if mask is not None:
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad), (0, 0)), constant_values=True)
        mask = mask.reshape(mask.shape[:2] + (n, block, mask.shape[-1])).transpose(2, 0, 1, 3, 4)
    step = jax.checkpoint(lambda qm: _xla_attention(qm[0], k, v, qm[1], scale, eager_logits))
    out = jax.lax.map(step, (q, mask))  # [n, B, block, H, d]
    return out.swapaxes(0, 1).reshape(b, n * block, h, d)[:, :t]
