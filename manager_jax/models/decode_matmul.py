"""The projections of a decode step on GPU as Pallas (Triton) kernels with their neighbours fused.

A decode step multiplies a few rows (the tokens decoded together) by every weight matrix of every
layer: it is a weight read, and at batch 1 XLA runs each layer as about ten kernels, the small ones
bound by their own latency (RESULTS.md, session 13). These kernels do a layer's projections in four:

- q/k/v: the input RMSNorm, then the three matmuls into one [rows, H + 2 KV heads, d] output (the
  layout `decode_attention` reads; its biases are added there);
- o: the matmul plus the residual add;
- gate/up: the post-attention RMSNorm, both matmuls and silu(gate) * up;
- down: the matmul plus the residual add.

Each program makes one block of `block_n` output columns for every row, reading its columns of the
weight once, `block_k` rows at a time (Triton pipelines the reads over `num_stages`); gate/up reads
both weights' tiles in the same loop step. The norm first reads each row's input in chunks of up to
512 columns, all requested at once (2 loads for K = 896 rather than K / block_k, waited for
together): at batch 1 a kernel's time follows its sequential loop steps (about 0.7 us each on an
H200). The rows are padded to 16 inside the kernel (Triton's matmul tile).

Numerics follow the model's modules: the norm in fp32 rounded to the activation dtype, then times
its scale; products accumulated in fp32 and rounded before the residual add or the gate; silu(gate)
in fp32 rounded once, times up, rounded (`qwen2.swiglu`, as torch). On CPU (interpret mode) the
results equal XLA's bit for bit in bfloat16.

Off the GPU the kernels run in Pallas interpret mode (tests).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

_MIN_ROWS = 16  # Triton's matmul tile
SITES = ("qkv", "o", "gate_up", "down")
SPLIT_SITES = ("o", "down")  # the projections whose config may split the input (`MatmulConfig.splits`)


@dataclasses.dataclass(frozen=True)
class MatmulConfig:
    """How one projection divides its work (speed only: every choice gives the same result).

    block_n: output columns per program (the largest power of two <= this dividing the columns);
    block_k: weight rows per loop step, a power of two (at most the one >= the input size); when it
      does not divide the input size the last step's loads are masked (fewer, longer steps: at
      batch 1 a kernel's time follows its steps); num_warps / num_stages: Triton's;
    splits: the o and down projections only (`matmul_add`): the input size is split over this many
      programs per column block, whose fp32 partial sums XLA adds up with the residual in one more
      kernel. Their 896 output columns make few programs; splitting K makes more, each with fewer
      weight rows to stream.
    """

    block_n: int = 32
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3
    splits: int = 1

    @classmethod
    def parse(cls, text: str) -> "MatmulConfig":
        """"block_n,block_k,num_warps,num_stages[,splits]", e.g. "32,128,4,3" or "16,256,4,4,4"."""
        try:
            fields = [int(x) for x in text.split(",")]
        except ValueError:
            fields = []
        if len(fields) not in (4, 5) or min(fields) < 1:
            raise ValueError(f"a matmul config is four or five positive integers "
                             f"block_n,block_k,num_warps,num_stages[,splits]; got {text!r}")
        return cls(*fields)

    def __str__(self) -> str:
        fields = (self.block_n, self.block_k, self.num_warps, self.num_stages) + ((self.splits,) if self.splits > 1 else ())
        return ",".join(map(str, fields))


def parse_matmul_configs(text: str) -> dict[str, MatmulConfig]:
    """Configs by projection: "SITE=block_n,block_k,warps,stages;..." with SITE one of `SITES`
    (what benchmarks/decode_matmul.py prints as the fastest), e.g. "qkv=16,128,4,3;down=32,256,4,4"."""
    configs = {}
    for item in filter(None, (x.strip() for x in text.split(";"))):
        site, sep, config = item.partition("=")
        if not sep or site.strip() not in SITES:
            raise ValueError(f"a matmul config by projection is SITE=block_n,block_k,num_warps,num_stages with "
                             f"SITE one of {', '.join(SITES)}; got {item!r}")
        configs[site.strip()] = MatmulConfig.parse(config)
    return configs


def _block(size: int, largest: int) -> int | None:
    """The largest power of two in [16, largest] that divides `size` (None: none does)."""
    b = 1 << (max(largest, 1).bit_length() - 1)
    while b >= 16:
        if size % b == 0:
            return b
        b //= 2
    return None


def _step_block(size: int, largest: int) -> int:
    """block_k's rows per step: the largest power of two <= `largest` (at least 16), at most the
    power of two that covers `size`."""
    return max(16, min(1 << (max(largest, 1).bit_length() - 1), 1 << (size - 1).bit_length()))


def supported(in_size: int, out_sizes: Sequence[int], config: MatmulConfig = MatmulConfig()) -> bool:
    """Whether the kernels take these sizes: Triton blocks are powers of two >= 16."""
    return _block(in_size, config.block_k) is not None and all(
        _block(n, config.block_n) is not None for n in out_sizes)


_NORM_CHUNK = 512  # input columns per load of the norm's pass (a power of two, as Triton's blocks)


def _norm_factor(x_ref, rows, row_mask, in_size: int, eps: float):
    """1 / rms of each row of x [M, K] in fp32, [R] (the first pass over the small input), read in
    chunks of the next power of two >= K, at most `_NORM_CHUNK` columns (the last one masked)."""
    from jax.experimental.pallas import triton as plgpu

    chunk = min(1 << (in_size - 1).bit_length(), _NORM_CHUNK)

    def load(i):
        cols = i * chunk + jax.lax.broadcasted_iota(jnp.int32, (chunk,), 0)
        mask = row_mask[:, None] & (cols < in_size)[None, :]
        return plgpu.load(x_ref.at[rows[:, None], cols[None, :]], mask=mask, other=0.0).astype(jnp.float32)

    # Every chunk is requested before the first is summed: in a loop, each step's load waited for
    # the previous step's sum (a memory round trip each, in the sm_90 code).
    total = jnp.zeros(rows.shape, jnp.float32)
    for x in [load(i) for i in range(-(-in_size // chunk))]:
        total = total + jnp.sum(x * x, axis=1)
    return jax.lax.rsqrt(total / in_size + eps)


def _k_steps(in_size: int, block_k: int) -> int:
    """Loop steps over an input of `in_size` in blocks of `block_k` (the last one masked if partial)."""
    return -(-in_size // block_k)


def _product(x_ref, scale_ref, inv, w_refs, col0, rows, row_mask, *, block_n: int, block_k: int, dtype,
             k_blocks=None):
    """The program's [R, block_n] blocks of x @ w for each w of `w_refs` in fp32, a tuple (x RMS-normalised
    first when `inv` is given), over the input's blocks `k_blocks` = (first, stop) of `block_k` (default:
    all). One loop for all the weights: each step reads x's block once and every weight's tile. Input
    rows past the input size (a last block that `block_k` does not fill) are read as zeros."""
    from jax.experimental.pallas import triton as plgpu

    in_size = x_ref.shape[1]
    masked = in_size % block_k != 0
    first, stop = k_blocks if k_blocks is not None else (0, _k_steps(in_size, block_k))
    out_cols = col0 + jax.lax.broadcasted_iota(jnp.int32, (block_n,), 0)

    def body(i, accs):
        k0 = pl.multiple_of(i * block_k, block_k)
        cols = k0 + jax.lax.broadcasted_iota(jnp.int32, (block_k,), 0)
        in_k = cols < in_size
        x_mask = row_mask[:, None] & in_k[None, :] if masked else row_mask[:, None]
        x = plgpu.load(x_ref.at[rows[:, None], cols[None, :]], mask=x_mask, other=0.0)
        if inv is not None:  # layers.RMSNorm: normalised in fp32, rounded, times the scale (rounded)
            normed = (x.astype(jnp.float32) * inv[:, None]).astype(dtype)
            scale = (plgpu.load(scale_ref.at[cols], mask=in_k, other=0.0) if masked
                     else scale_ref[pl.ds(k0, block_k)]).astype(dtype)
            x = (scale.astype(jnp.float32)[None, :] * normed.astype(jnp.float32)).astype(dtype)
        if masked:
            ws = [plgpu.load(w_ref.at[cols[:, None], out_cols[None, :]], mask=in_k[:, None], other=0.0)
                  for w_ref in w_refs]
        else:
            ws = [w_ref[pl.ds(k0, block_k), pl.ds(col0, block_n)] for w_ref in w_refs]
        return tuple(acc + jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32)
                     for acc, w in zip(accs, ws))

    zeros = jnp.zeros((rows.shape[0], block_n), jnp.float32)
    return jax.lax.fori_loop(first, stop, body, tuple(zeros for _ in w_refs))


def _kernel(*refs, kind: str, blocks: tuple[int, ...], block_n: int, block_k: int, eps: float, rows_used: int,
            dtype, splits: int = 1):
    """One program: one block of output columns, for every row.

    refs: x, [norm scale], weights..., [residual], out. kind: "concat" (the weights' outputs side
    by side; `blocks` column blocks each), "gated" (silu(x @ w0) * (x @ w1)), "residual"
    (residual + x @ w0), "partial" (x @ w0 over split program_id(1) of `splits` of the input, fp32
    into out [splits, M, N])."""
    from jax.experimental.pallas import triton as plgpu

    x_ref, out_ref = refs[0], refs[-1]
    norm = kind in ("concat", "gated")
    scale_ref = refs[1] if norm else None
    w_refs = refs[2:-1] if norm else refs[1:-2] if kind == "residual" else refs[1:-1]
    rows = jax.lax.broadcasted_iota(jnp.int32, (max(_MIN_ROWS, 1 << (rows_used - 1).bit_length()),), 0)
    row_mask = rows < rows_used
    inv = _norm_factor(x_ref, rows, row_mask, x_ref.shape[1], eps) if norm else None
    p = pl.program_id(0)
    product = functools.partial(_product, x_ref, scale_ref, inv, rows=rows, row_mask=row_mask, block_n=block_n,
                                block_k=block_k, dtype=dtype)

    columns = lambda col0: (col0 + jax.lax.broadcasted_iota(jnp.int32, (block_n,), 0))[None, :]

    def store(col0, value):
        plgpu.store(out_ref.at[rows[:, None], columns(col0)], value.astype(dtype), mask=row_mask[:, None])

    if kind == "partial":
        steps = _k_steps(x_ref.shape[1], block_k)
        col, per = pl.multiple_of(p * block_n, block_n), -(-steps // splits)
        first = pl.program_id(1) * per
        stop = jnp.minimum(first + per, steps)
        value, = product(w_refs[:1], col, k_blocks=(first, stop))
        plgpu.store(out_ref.at[pl.program_id(1), rows[:, None], columns(col)], value, mask=row_mask[:, None])
        return
    if kind == "concat":
        start = 0
        for w_ref, n in zip(w_refs, blocks):
            @pl.when((p >= start) & (p < start + n))
            def _(w_ref=w_ref, start=start):
                col = pl.multiple_of((p - start) * block_n, block_n)
                store(pl.multiple_of(p * block_n, block_n), product((w_ref,), col)[0])
            start += n
        return
    col = pl.multiple_of(p * block_n, block_n)
    if kind == "gated":  # qwen2.swiglu: silu in fp32 rounded once, times up, rounded by the store
        r = lambda v: v.astype(dtype).astype(jnp.float32)
        g, u = map(r, product(w_refs[:2], col))
        store(col, r(g * (1.0 / (1.0 + jnp.exp(-g)))) * u)
    else:  # the residual stream plus the rounded product
        residual = plgpu.load(refs[-2].at[rows[:, None], columns(col)], mask=row_mask[:, None], other=0.0)
        store(col, residual.astype(jnp.float32) + product(w_refs[:1], col)[0].astype(dtype).astype(jnp.float32))


def _call(kind: str, x, weights, *, scale=None, residual=None, eps: float = 0.0, config: MatmulConfig, interpret: bool,
          name: str):
    from jax.experimental.pallas import triton as plgpu

    m, k = x.shape
    # A power of two >= 16 must divide the input (`supported`); a larger block_k masks its last step.
    block_k = _block(k, config.block_k) and _step_block(k, config.block_k)
    block_ns = [_block(w.shape[1], config.block_n) for w in weights]
    block_n = None if None in block_ns else min(block_ns)
    if block_k is None or block_n is None or any(w.shape[0] != k for w in weights):
        raise ValueError(f"decode matmul: input size {k} and output sizes {[w.shape[1] for w in weights]} need "
                         f"blocks that are powers of two >= 16 (config {config})")
    if config.splits > 1 and kind != "residual":
        raise ValueError(f"decode matmul: splits of the input are for the o and down projections only (config {config})")
    blocks = tuple(w.shape[1] // block_n for w in weights)
    out_cols = sum(w.shape[1] for w in weights) if kind == "concat" else weights[0].shape[1]
    splits = min(config.splits, _k_steps(k, block_k))
    if splits > 1:  # fp32 partial sums per split, added up with the residual by XLA (one reduction kernel)
        kind, residual, out_shape = "partial", None, jax.ShapeDtypeStruct((splits, m, out_cols), jnp.float32)
    else:
        out_shape = jax.ShapeDtypeStruct((m, out_cols), x.dtype)
    operands = [x, *([scale] if scale is not None else []), *weights, *([residual] if residual is not None else [])]
    return pl.pallas_call(
        functools.partial(_kernel, kind=kind, blocks=blocks, block_n=block_n, block_k=block_k, eps=eps, rows_used=m,
                          dtype=x.dtype, splits=splits),
        grid=(sum(blocks) if kind == "concat" else blocks[0],) + ((splits,) if splits > 1 else ()),
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name=name,
    )(*operands)


@functools.partial(jax.jit, static_argnames=("eps", "config", "interpret"))
def norm_qkv(x, scale, wq, wk, wv, *, eps: float, config: MatmulConfig = MatmulConfig(), interpret: bool = False):
    """RMSNorm(x) @ [wq | wk | wv]: x [M, D] (the residual stream), scale [D] -> [M, Nq + Nk + Nv]."""
    return _call("concat", x, (wq, wk, wv), scale=scale, eps=eps, config=config, interpret=interpret,
                 name="decode_matmul_norm_qkv")


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def matmul_add(x, w, residual, *, config: MatmulConfig = MatmulConfig(), interpret: bool = False):
    """residual + x @ w: x [M, K], w [K, N], residual [M, N] -> [M, N] (the o and down projections)."""
    out = _call("residual", x, (w,), residual=residual, config=config, interpret=interpret, name="decode_matmul_add")
    if out.ndim == 3:  # partial sums of the input's splits: the product rounded, then the residual add
        out = (residual.astype(jnp.float32) + out.sum(axis=0).astype(x.dtype).astype(jnp.float32)).astype(x.dtype)
    return out


@functools.partial(jax.jit, static_argnames=("eps", "config", "interpret"))
def norm_gated(x, scale, w_gate, w_up, *, eps: float, config: MatmulConfig = MatmulConfig(), interpret: bool = False):
    """silu(RMSNorm(x) @ w_gate) * (RMSNorm(x) @ w_up): x [M, D] -> [M, I] (Qwen2's MLP before down)."""
    return _call("gated", x, (w_gate, w_up), scale=scale, eps=eps, config=config, interpret=interpret,
                 name="decode_matmul_norm_gated")
