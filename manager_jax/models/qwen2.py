"""Qwen2 decoder (SPEC §1.4): RMSNorm, half-split RoPE, GQA with q/k/v bias, SwiGLU MLP.

The decoder runs its stacked layers in runs between Manager injection points: an `inject(j, h)`
callback is applied before each injection layer (prefill / full forward only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from flax import nnx

from manager_jax.config import TextConfig
from manager_jax.models.attention import (current_attention_mesh, dot_product_attention, segment_causal_mask,
                                         splash_applies, splash_attention)
from manager_jax.models.decode_attention import KernelConfig, decode_attention, decode_attention_on_mesh, supported
from manager_jax.models import decode_matmul
from manager_jax.models.layers import MLP_ACTIVATION, NORM_OUTPUT, RESIDUAL_SUM, RMSNorm, linear, round_to, make_stacked, run_stacked, split_stack
from manager_jax.platform import target_platform


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin [B, T, head_dim] computed in fp32 and cast to the activation dtype (as HF)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, H, d]; rotate_half(x) = [-x2, x1] (not interleaved)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


@dataclass
class AttentionContext:
    """What every layer's attention needs, computed once per forward."""

    cos: jax.Array
    sin: jax.Array
    q_slot: jax.Array  # [T] physical slots of the queries
    q_seg: jax.Array  # [B, T]
    kv_seg: jax.Array  # [B, S] (S = T without cache, cache length with one)
    cache_index: jax.Array | None = None  # where the new keys go in the cache
    plain_causal: bool = False
    # Queries at slots 0..T-1 attending to their own keys with the same segments (training rows,
    # prefill, scoring): what the Splash kernel computes.
    fresh_causal: bool = False


jax.tree_util.register_dataclass(
    AttentionContext,
    data_fields=["cos", "sin", "q_slot", "q_seg", "kv_seg", "cache_index"],
    meta_fields=["plain_causal", "fresh_causal"],
)


class Qwen2Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, impl: str, rngs: nnx.Rngs):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q = linear(d, cfg.num_heads * hd, bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.k = linear(d, cfg.num_kv_heads * hd, bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.v = linear(d, cfg.num_kv_heads * hd, bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.o = linear(cfg.num_heads * hd, d, bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.impl = impl
        # One-token decode steps over the KV cache: "xla" (the XLA path) or "pallas" (one fused GPU
        # kernel, models/decode_attention.py; Pallas interpret mode off the GPU). The inference
        # engine sets it on its decode graph.
        self.decode_impl = "xla"
        # The fused kernels' division of the work, by the rows decoded together: ((rows,
        # KernelConfig), ...); rows not listed get `KernelConfig.default_for(rows)`. Set by the engine too.
        self.decode_kernels = ()

    def fused_decode_applies(self, x: jax.Array, ctx: AttentionContext, cache: tuple | None) -> bool:
        """Whether this call is a one-token decode step that the fused GPU kernels take."""
        return (cache is not None and self.decode_impl == "pallas" and x.shape[1] == 1 < ctx.kv_seg.shape[1]
                and isinstance(cache[1], (int, np.integer)) and supported(ctx.kv_seg.shape[1], self.head_dim)
                and cache[0][0].dtype == (self.q.dtype or x.dtype))

    def attend_fused(self, qkv: jax.Array, ctx: AttentionContext, cache: tuple):
        """The decode-attention kernels on one device: qkv [B, H + 2 KV, d], the q/k/v projections
        without their biases -> (out [B, H * d], new cache)."""
        (ck, cv), layer = cache
        b = qkv.shape[0]
        biases = tuple(lin.bias[...].astype(qkv.dtype).reshape(-1, self.head_dim) for lin in (self.q, self.k, self.v))
        out, ck, cv = decode_attention(qkv, biases, ctx.cos[:, 0], ctx.sin[:, 0], ck, cv, ctx.q_seg[:, 0], ctx.kv_seg,
                                       ctx.cache_index, **self._kernel_step(int(layer), b))
        return out.reshape(b, -1), (ck, cv)

    def _kernel_step(self, layer: int, rows: int) -> dict:
        return dict(layer=layer, interpret=target_platform() != "gpu",
                    config=dict(self.decode_kernels).get(rows) or KernelConfig.default_for(rows))

    def _fused_decode(self, x: jax.Array, ctx: AttentionContext, cache: tuple):
        """A one-token decode step on the fused GPU kernels (`decode_impl="pallas"`): the q/k/v
        matmuls without their biases go in as they are (XLA merges them into one matmul whose output
        the kernel reads in place); biases, RoPE, the cache write and attention happen inside."""
        (ck, cv), layer = cache
        b = x.shape[0]
        dtype = self.q.dtype or x.dtype
        rows = x[:, 0].astype(dtype)
        flat = lambda lin: rows @ lin.kernel[...].astype(dtype)
        project = lambda lin: flat(lin).reshape(b, -1, self.head_dim)
        biases = tuple(lin.bias[...].astype(dtype).reshape(-1, self.head_dim) for lin in (self.q, self.k, self.v))
        step = self._kernel_step(int(layer), b)
        token = (ctx.cos[:, 0], ctx.sin[:, 0], ck, cv, ctx.q_seg[:, 0], ctx.kv_seg, ctx.cache_index)
        where = current_attention_mesh()
        if where is None or where.mesh.size == 1:
            # Joined before splitting into heads: XLA's merged q/k/v matmul output then is the
            # kernel's input as it is. Joined per head, a copy kernel rebuilt it every layer.
            qkv = jnp.concatenate([flat(self.q), flat(self.k), flat(self.v)], axis=1).reshape(b, -1, self.head_dim)
            out, (ck, cv) = self.attend_fused(qkv, ctx, cache)
            return self.o(out[:, None]), (ck, cv)
        else:  # each device on its rows and heads
            out, ck, cv = decode_attention_on_mesh(project(self.q), project(self.k), project(self.v), biases, *token,
                                                   mesh=where.mesh, row_axes=where.row_axes,
                                                   head_axis=where.head_axis, **step)
        return self.o(out.reshape(b, 1, -1)), (ck, cv)

    def __call__(self, x: jax.Array, ctx: AttentionContext, cache: tuple | None = None):
        b, t, _ = x.shape
        if self.fused_decode_applies(x, ctx, cache):
            return self._fused_decode(x, ctx, cache)
        q = self.q(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        if cache is not None:
            # cache = ((k_all, v_all) [L, B, S_max, KV, d], layer): the whole cache is carried
            # through the layer scan and updated in place (no per-step copy of the cache).
            (ck, cv), layer = cache
            zero = jnp.zeros((), jnp.int32)
            start = (layer, zero, jnp.asarray(ctx.cache_index, jnp.int32), zero, zero)
            ck = jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), start)
            cv = jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), start)
            cache = (ck, cv)
            # Attend over the first kv_seg.shape[1] slots. When that is exactly this call's keys
            # (a prefill written at slot 0), use them directly instead of reading them back.
            fresh = ctx.kv_seg.shape[1] == t
            if not fresh:
                slots = ctx.kv_seg.shape[1]
                if isinstance(layer, (int, np.integer)):
                    # Unrolled layers: a static slice, which XLA reads in place (a dynamic one was
                    # copied out of the cache for every layer and token).
                    k, v = ck[int(layer), :, :slots].astype(q.dtype), cv[int(layer), :, :slots].astype(q.dtype)
                else:
                    read = (1, b, slots) + ck.shape[3:]
                    k = jax.lax.dynamic_slice(ck, (layer, zero, zero, zero, zero), read)[0].astype(q.dtype)
                    v = jax.lax.dynamic_slice(cv, (layer, zero, zero, zero, zero), read)[0].astype(q.dtype)
        else:
            fresh = True
        kv_slot = jnp.arange(k.shape[1])
        if fresh and ctx.fresh_causal and splash_applies(self.impl, t):  # training rows, prefill
            out = splash_attention(q, k, v, ctx.q_seg)
        elif ctx.plain_causal and fresh and self.impl not in ("xla", "splash"):
            out = dot_product_attention(q, k, v, mask=None, impl=self.impl, plain_causal=True)
        else:
            mask = segment_causal_mask(ctx.q_slot, kv_slot, ctx.q_seg, ctx.kv_seg)
            out = dot_product_attention(q, k, v, mask=mask, impl="xla")
        out = checkpoint_name(out, "attn_out")
        return self.o(out.reshape(b, t, -1)), cache


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) * up as torch computes it in bf16 / fp16: silu in fp32 rounded once to the
    compute dtype, then the product rounded (decode_matmul's gated kernel does the same)."""
    act = round_to(jax.nn.silu(gate.astype(jnp.float32)), gate.dtype) * up.astype(jnp.float32)
    return act.astype(gate.dtype)


class Qwen2MLP(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        mk = lambda i, o: linear(i, o, bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate = mk(cfg.hidden_size, cfg.intermediate_size)
        self.up = mk(cfg.hidden_size, cfg.intermediate_size)
        self.down = mk(cfg.intermediate_size, cfg.hidden_size)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(checkpoint_name(swiglu(self.gate(x), self.up(x)), MLP_ACTIVATION))


class Qwen2Layer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, impl: str, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.attn = Qwen2Attention(cfg, dtype=dtype, param_dtype=param_dtype, impl=impl, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = Qwen2MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # One-token decode steps' projections: "xla", or "pallas" (models/decode_matmul.py: four
        # GPU kernels with the norms, the residual adds and the gate fused in; on one device, with
        # the fused attention kernels). `decode_matmul_kernels`: ((site, MatmulConfig), ...) for
        # the sites not on their defaults. Set by the inference engine on its decode graph.
        self.decode_matmul = "xla"
        self.decode_matmul_kernels = ()

    def __call__(self, x: jax.Array, ctx: AttentionContext, cache=None):
        if self.decode_matmul == "pallas" and self.attn.fused_decode_applies(x, ctx, cache) and self._fused_fits(x):
            return self._fused_decode(x, ctx, cache)
        # The norms' outputs are named for remat "dots_acts" (models/layers.py); a no-op otherwise.
        a, cache = self.attn(checkpoint_name(self.input_norm(x), NORM_OUTPUT), ctx, cache)
        x = checkpoint_name(x + a, RESIDUAL_SUM)
        return x + self.mlp(checkpoint_name(self.post_attn_norm(x), NORM_OUTPUT)), cache

    def _configs(self) -> dict:
        return {site: dict(self.decode_matmul_kernels).get(site, decode_matmul.MatmulConfig())
                for site in decode_matmul.SITES}

    def _fused_fits(self, x: jax.Array) -> bool:
        where = current_attention_mesh()
        if where is not None and where.mesh.size > 1:
            return False
        attn, mlp, c = self.attn, self.mlp, self._configs()
        d, heads = x.shape[-1], lambda lin: lin.kernel.shape[1]
        linears = (attn.q, attn.k, attn.v, attn.o, mlp.gate, mlp.up, mlp.down)
        if any(lin.kernel.dtype != (attn.q.dtype or x.dtype) for lin in linears):
            return False  # weights stored in another dtype would be cast, a full copy, every token: XLA fuses that
        return (decode_matmul.supported(d, [heads(attn.q), heads(attn.k), heads(attn.v)], c["qkv"])
                and decode_matmul.supported(attn.o.kernel.shape[0], [d], c["o"])
                and decode_matmul.supported(d, [heads(mlp.gate)], c["gate_up"])
                and decode_matmul.supported(mlp.down.kernel.shape[0], [d], c["down"]))

    def _fused_decode(self, x: jax.Array, ctx: AttentionContext, cache: tuple):
        """A one-token decode step of the whole layer on GPU kernels: the projections of
        models/decode_matmul.py around the decode-attention kernels, six kernels in all."""
        attn, mlp, c = self.attn, self.mlp, self._configs()
        b, dtype = x.shape[0], attn.q.dtype or x.dtype
        interpret = target_platform() != "gpu"
        weight = lambda lin: lin.kernel[...].astype(dtype)
        h = x[:, 0].astype(dtype)
        qkv = decode_matmul.norm_qkv(h, self.input_norm.scale[...], weight(attn.q), weight(attn.k), weight(attn.v),
                                     eps=self.input_norm.eps, config=c["qkv"], interpret=interpret)
        out, cache = attn.attend_fused(qkv.reshape(b, -1, attn.head_dim), ctx, cache)
        h = decode_matmul.matmul_add(out, weight(attn.o), h, config=c["o"], interpret=interpret)
        act = decode_matmul.norm_gated(h, self.post_attn_norm.scale[...], weight(mlp.gate), weight(mlp.up),
                                       eps=self.post_attn_norm.eps, config=c["gate_up"], interpret=interpret)
        h = decode_matmul.matmul_add(act, weight(mlp.down), h, config=c["down"], interpret=interpret)
        return h[:, None], cache


class Qwen2Decoder(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, impl="auto", scan_layers=True, remat_policy="none", rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
                               embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.layers = make_stacked(
            lambda r: Qwen2Layer(cfg, dtype=dtype, param_dtype=param_dtype, impl=impl, rngs=r), cfg.num_layers, rngs
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.scan_layers = scan_layers
        self.remat_policy = remat_policy

    def context(self, positions, q_seg, *, kv_seg=None, q_slot=None, cache_index=None, plain_causal=False):
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, self.dtype)
        t = positions.shape[1]
        fresh_causal = q_slot is None and (kv_seg is None or kv_seg is q_seg)
        q_slot = jnp.arange(t) if q_slot is None else q_slot
        return AttentionContext(cos, sin, q_slot, q_seg, q_seg if kv_seg is None else kv_seg, cache_index, plain_causal,
                                fresh_causal)

    def __call__(
        self,
        h: jax.Array,
        ctx: AttentionContext,
        *,
        injection_layers: tuple[int, ...] = (),
        inject: Callable[[int, jax.Array], jax.Array] | None = None,
        cache: tuple | None = None,
        layers: Sequence[nnx.Module] | None = None,
    ):
        """h [B, T, D] input embeddings -> (normed hidden [B, T, D], new cache).

        `cache` is (k, v) with k/v [L, B, S_max, KV, d]; it is carried whole through the layer scan
        and each layer writes its new keys/values at `ctx.cache_index` in place; attention reads the
        first `ctx.kv_seg.shape[1]` slots. Injections run before the layers in `injection_layers`
        (prefill only). `layers`: separate per-layer modules (`unstack_layers`) to run unrolled
        instead of the stacked ones (the inference decode loop).
        """
        bounds = sorted(set([0, *injection_layers, self.cfg.num_layers]))
        if cache is None:
            body = lambda layer, x, _: (layer(x, ctx)[0], None)
            layer_ids = None
        else:
            # The carry holds (hidden, whole cache); each layer writes its slice at its index.
            def body(layer, carry, index):
                x, kv = carry
                x, kv = layer(x, ctx, (kv, index))
                return (x, kv), None
            # numpy ids: the unrolled loop hands each layer a Python-level index (static slices).
            layer_ids = np.arange(self.cfg.num_layers, dtype=np.int32)
        scan = self.scan_layers and layers is None
        if layers is None:  # unrolled: split once for every piece between injections
            layers = self.layers if scan else split_stack(self.layers)
        for a, b in zip(bounds[:-1], bounds[1:]):
            if inject is not None and a in injection_layers:
                h = inject(injection_layers.index(a), h)
            carry = h if cache is None else (h, cache)
            carry, _ = run_stacked(
                layers, carry, body, start=a, stop=b, scan=scan, remat_policy=self.remat_policy, xs=layer_ids,
            )
            h, cache = (carry, None) if cache is None else carry
        return self.norm(h), cache
