"""SigLIP vision tower as LLaVA-OV uses it (SPEC §1.1): no head, post-LN kept but unused."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from manager_jax.config import VisionConfig
from manager_jax.models.attention import dot_product_attention, unmasked_row_multiple
from manager_jax.models.layers import MLP_ACTIVATION, NORM_OUTPUT, RESIDUAL_SUM, activation, linear, make_stacked, run_stacked, split_stack


class SiglipAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, impl: str = "auto", rngs: nnx.Rngs):
        d = cfg.hidden_size
        mk = lambda: linear(d, d, bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q, self.k, self.v, self.o = mk(), mk(), mk(), mk()
        self.num_heads = cfg.num_heads
        # Crops attend fully (no mask): under "auto" cuDNN on GPU, Splash on TPU (crops padded to 768).
        self.impl = impl

    def __call__(self, x: jax.Array, valid_len: int | None = None) -> jax.Array:
        """x [C, T, D]; `valid_len`: the crops come padded and only their first `valid_len` tokens
        are real (see `dot_product_attention`)."""
        b, t, d = x.shape
        heads = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)
        # eager_logits: the original SigLIP attention is eager only, its scores rounded to bf16 / fp16
        # before the fp32 softmax (SPEC §1.1); the XLA path does the same, the fused kernels cannot.
        out = dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), mask=None, impl=self.impl,
                                    valid_len=valid_len, eager_logits=True)
        return self.o(out.reshape(b, t, d))


class SiglipMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.fc1 = linear(cfg.hidden_size, cfg.intermediate_size, bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc2 = linear(cfg.intermediate_size, cfg.hidden_size, bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        # gelu_pytorch_tanh, computed in fp32 and rounded once as torch's kernel (in bf16 / fp16
        # jax.nn.gelu rounds its constants and intermediates to the input dtype).
        return self.fc2(checkpoint_name(activation(jax.nn.gelu, self.fc1(x), approximate=True), MLP_ACTIVATION))


class SiglipLayer(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, impl: str = "auto", rngs: nnx.Rngs):
        ln = lambda: nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.ln1 = ln()
        self.attn = SiglipAttention(cfg, dtype=dtype, param_dtype=param_dtype, impl=impl, rngs=rngs)
        self.ln2 = ln()
        self.mlp = SiglipMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, valid_len: int | None = None) -> jax.Array:
        # The norms' outputs are named for remat "dots_acts" (models/layers.py); a no-op otherwise.
        x = checkpoint_name(x + self.attn(checkpoint_name(self.ln1(x), NORM_OUTPUT), valid_len), RESIDUAL_SUM)
        return x + self.mlp(checkpoint_name(self.ln2(x), NORM_OUTPUT))


class SiglipTower(nnx.Module):
    """pixels [C, 384, 384, 3] -> hidden states; one scan over the encoder layers."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, scan_layers=True, remat_policy="none",
                 impl: str = "auto", token_multiple: int = 0, rngs: nnx.Rngs):
        """`token_multiple`: the encoder layers run on crops padded to a multiple of this many tokens
        (exact: the padding is masked out of attention); 0 = the attention's own preference
        (`unmasked_row_multiple`: 729 -> 768 for cuDNN and Splash, unpadded elsewhere)."""
        self.cfg = cfg
        self.dtype = dtype
        self.token_multiple = token_multiple
        self.attention_impl = impl
        self.patch_embed = nnx.Conv(
            3, cfg.hidden_size, kernel_size=(cfg.patch_size, cfg.patch_size), strides=(cfg.patch_size, cfg.patch_size),
            padding="VALID", use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )
        self.pos_embed = nnx.Param(
            jax.random.normal(rngs.params(), (cfg.num_patches, cfg.hidden_size), param_dtype) * 0.02
        )
        self.layers = make_stacked(
            lambda r: SiglipLayer(cfg, dtype=dtype, param_dtype=param_dtype, impl=impl, rngs=r), cfg.num_layers, rngs
        )
        self.post_ln = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.scan_layers = scan_layers
        self.remat_policy = remat_policy

    def embed(self, pixels: jax.Array) -> jax.Array:
        # The stride-p p x p convolution as one matmul over the flattened patches (same numbers,
        # VALID padding drops the remainder pixels; XLA:CPU runs this conv ~10x slower).
        c, height, width, channels = pixels.shape
        p = self.cfg.patch_size
        rows, cols = height // p, width // p
        x = pixels[:, : rows * p, : cols * p].astype(self.dtype)
        x = x.reshape(c, rows, p, cols, p, channels).transpose(0, 1, 3, 2, 4, 5)  # [C, 27, 27, p, p, 3]
        kernel = self.patch_embed.kernel[...].astype(self.dtype)  # [p, p, 3, D] (HWIO)
        x = jnp.einsum("cijklm,klmd->cijd", x, kernel) + self.patch_embed.bias[...].astype(self.dtype)
        return x.reshape(c, rows * cols, self.cfg.hidden_size) + self.pos_embed[...].astype(self.dtype)

    def __call__(self, pixels: jax.Array, select_layers: list[int] | None = None):
        """Returns (last [C, 729, Dv], selected [N, C, 729, Dv] or None).

        `selected[i]` is hidden_states[select_layers[i]] with hidden_states[0] the embeddings and
        hidden_states[k] the output of encoder layer k-1 (SPEC §1.1); `last` is hidden_states[-1]
        before post_layernorm.
        """
        h0 = self.embed(pixels)
        n = h0.shape[1]
        multiple = self.token_multiple or unmasked_row_multiple(self.attention_impl, h0.dtype,
                                                                 self.cfg.hidden_size // self.cfg.num_heads)
        padded = -(-n // multiple) * multiple
        valid_len = n if padded != n else None
        # Padded once for every layer: the rows' matmuls get aligned shapes (7,290 rows of 10
        # crops made the weight-gradient GEMMs take 2-element-aligned kernels on GPU) and the
        # flash kernel needs no per-layer padding; on TPU the Splash kernel needs 128-multiples.
        h0_run = jnp.pad(h0, ((0, 0), (0, padded - n), (0, 0))) if valid_len else h0
        body = lambda layer, h, _: (lambda y: (y, y))(layer(h, valid_len))
        layers = self.layers if self.scan_layers else split_stack(self.layers)  # split once for both runs
        run = lambda h, start, stop, collect: run_stacked(
            layers, h, body, start=start, stop=stop, scan=self.scan_layers,
            remat_policy=self.remat_policy, collect=collect,
        )
        real = lambda h: h[..., :n, :] if valid_len else h
        if not select_layers:
            return real(run(h0_run, 0, None, False)[0]), None
        # The tail scan starts at the first selected layer and emits each layer's *input*: under
        # remat that input is also the scan's saved residual, so the selected hidden states are
        # not kept a second time.
        first = min(k for k in select_layers if k > 0) if any(k > 0 for k in select_layers) else 0
        h, _ = run(h0_run, 0, first, False)
        body_in = lambda layer, x, _: (layer(x, valid_len), x)
        last, tail = run_stacked(layers, h, body_in, start=first, stop=None, scan=self.scan_layers,
                                 remat_policy=self.remat_policy, collect=True)
        num = self.cfg.num_layers
        # hidden_states[k]: the embeddings (k = 0), tail[k - first] (first <= k < num), last (k = num).
        if select_layers == list(range(first, first + len(select_layers))) and first + len(select_layers) <= num:
            return real(last), real(tail[: len(select_layers)])  # the recipes' 13..25: no copy
        picked = [h0_run if k == 0 else last if k == num else tail[k - first] for k in select_layers]
        return real(last), real(jnp.stack(picked))
