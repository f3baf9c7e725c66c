"""Building blocks shared by the vision tower and the decoder: dense layers, norms, stacked layers."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# Forward calls of the fused attention kernels (cuDNN flash attention on GPU, the Pallas Splash
# kernel on TPU). Their outputs (the attention output and its softmax statistics) are what their
# backward needs: not saved, the backward pass runs every layer's attention forward a second time.
ATTENTION_KERNEL_PRIMITIVES = frozenset({"dot_product_attention_fwd_wrapper", "dot_product_attention_fwd", "pallas_call"})


def save_dots_and_attention_kernels(prim, *args, **params) -> bool:
    """Remat policy "dots": keep the outputs of the weight matmuls (dots without batch dimensions)
    and of the fused attention kernels. The XLA attention path's batched dots are recomputed: kept,
    their [T, S] scores would cost more memory than all the other residuals together."""
    return prim.name in ATTENTION_KERNEL_PRIMITIVES or jax.checkpoint_policies.dots_with_no_batch_dims_saveable(
        prim, *args, **params
    )


# Names (`jax.ad_checkpoint.checkpoint_name`) of the values that remat "dots_acts" keeps besides
# what "dots" keeps: the MLP activation (SigLIP's GELU output, Qwen2's silu(gate) * up), the
# attention's inputs (q, k, v after bias, RoPE and the padding mask) and masked output, and the
# layer norms' outputs (the inputs of the q/k/v and gate/up or fc1 matmuls).
MLP_ACTIVATION = "mlp_activation"
ATTENTION_IO = "attention_io"
NORM_OUTPUT = "norm_output"
RESIDUAL_SUM = "residual_sum"  # a layer's residual stream after its attention: the second norm's input


def save_dots_activations_and_attention_io(prim, *args, **params) -> bool:
    """Remat policy "dots_acts": "dots", plus the MLP activations, the attention's inputs and
    masked output, the layer norms' outputs and the residual sums they norm mid-layer.

    The MLP activation is the down projection's input, which its weight gradient reads. Recomputed,
    the backward pass runs the activation again and writes it out again; on GPU the SigLIP GELU's
    backward also splits into two kernels around a recomputed tanh. Kept, it costs one
    [tokens, intermediate] array per layer.

    The attention's inputs replace the q/k/v matmul outputs as residuals, at the same size: the
    backward no longer needs those. Recomputing bias, RoPE and the padding mask from them was one
    more pass over q, k and v per layer. XLA also merges the three matmuls into one and copied
    each slice out of it to keep them apart.

    Deviceless H100, unrolled 0.5B step: non-matmul traffic 117.5 -> 100.3 GB, 2,977 -> 2,603
    launches, +4 GiB of memory. With the layers in a scan, every kept value also gets a stacked
    buffer, and the program does not shrink (RESULTS.md, session 7).

    The norms' outputs are the weight gradients' other operand. Recomputed, the backward pass ran
    every norm again (its reduction and its write). Kept, the unrolled 0.5B step (deviceless H100)
    has 72 launches and 1.6 GB of writes fewer, for about 1.6 GB more memory (RESULTS.md, session 22).

    The residual sum after each layer's attention is the second norm's input, which its backward
    reads. Recomputed, each SigLIP layer's backward added it again in a kernel of its own (and
    Qwen2's norm backward read both addends). Kept, the step has 26 launches, 0.46 GB of writes
    and about 1.5 GB of reads fewer, at the same peak memory (RESULTS.md, session 25).
    """
    if prim.name == "name":
        return params.get("name") in (MLP_ACTIVATION, ATTENTION_IO, NORM_OUTPUT, RESIDUAL_SUM)
    return save_dots_and_attention_kernels(prim, *args, **params)


_REMAT_POLICIES = {
    "full": None,  # recompute everything
    "dots": save_dots_and_attention_kernels,
    "dots_acts": save_dots_activations_and_attention_io,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_attn_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
}


# A transform of each layer's params, applied inside the layer body of `run_stacked` (see
# `layer_params_transform`). None outside training.
_LAYER_PARAMS_TRANSFORM: contextvars.ContextVar[Callable[[nnx.Module, Any], Any] | None] = contextvars.ContextVar(
    "layer_params_transform", default=None
)


@contextlib.contextmanager
def layer_params_transform(transform: Callable[[nnx.Module, Any], Any]) -> Iterator[None]:
    """While tracing inside this block, `run_stacked` maps each layer's param state through
    ``transform(stacked_module, layer_state)`` inside the (scanned, rematerialised) layer body.

    The train step uses it to all-gather FSDP-sharded weights one layer at a time: the gather sits
    in the loop body, so only the current layer's whole weights are alive (and, under remat, the
    backward pass gathers them again), and each layer's gradient is reduce-scattered as it is made.
    """
    token = _LAYER_PARAMS_TRANSFORM.set(transform)
    try:
        yield
    finally:
        _LAYER_PARAMS_TRANSFORM.reset(token)


def is_16bit(dtype) -> bool:
    return dtype is not None and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def round_to(x: jax.Array, dtype) -> jax.Array:
    """fp32 `x` rounded to `dtype`'s precision and range, still fp32: where PyTorch rounds an
    intermediate to bf16 / fp16. A plain f32 -> bf16 -> f32 round trip is not enough: XLA (excess
    precision allowed, its default on CPU and GPU) drops such convert pairs inside a fusion;
    it keeps a reduce_precision."""
    if not is_16bit(dtype):
        return x
    info = jnp.finfo(dtype)
    return jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


def activation(fn: Callable, x: jax.Array, **kwargs) -> jax.Array:
    """`fn(x)` computed in fp32 and rounded once to x's dtype, as torch's activation kernels
    (their math runs in fp32 for bf16 / fp16 tensors; so does their backward)."""
    if not is_16bit(x.dtype):
        return fn(x, **kwargs)
    return _fp32_activation(_bound(fn, tuple(sorted(kwargs.items()))), x)


@functools.lru_cache(maxsize=None)
def _bound(fn: Callable, kwargs: tuple) -> Callable:
    return functools.partial(fn, **dict(kwargs))  # one object per (fn, kwargs): a static argument


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fp32_activation(fn: Callable, x: jax.Array) -> jax.Array:
    return fn(x.astype(jnp.float32)).astype(x.dtype)


def _fp32_activation_fwd(fn, x):
    # The residual is x itself: autodiff of the fp32 math kept its fp32 copy for the backward pass
    # (0.9 GiB more per v5p chip in the 0.5B stage-2 step).
    return _fp32_activation(fn, x), x


def _fp32_activation_bwd(fn, x, g):
    _, vjp = jax.vjp(fn, x.astype(jnp.float32))
    return (vjp(g.astype(jnp.float32))[0].astype(x.dtype),)


_fp32_activation.defvjp(_fp32_activation_fwd, _fp32_activation_bwd)


def linear(din: int, dout: int, *, bias: bool, dtype, param_dtype, rngs: nnx.Rngs,
           torch_bias_init: bool = False) -> nnx.Linear:
    """Dense layer with PyTorch nn.Linear's weight init (the weights are overwritten by checkpoints);
    biases zero, or with `torch_bias_init` nn.Linear's U(-1/sqrt(din), 1/sqrt(din)) (a layer the
    original builds after loading its checkpoint, which keeps torch's own init: the projector).

    In bf16 / fp16 the matmul output is rounded, then the bias added (a second rounding), where
    torch's addmm adds the bias to the fp32 accumulator. Adding it there made XLA write the GPU
    train step's biased matmuls in fp32 (8.4 GB more per step, compiled for an H100: RESULTS.md,
    session 15), so it is not done."""
    return nnx.Linear(
        din,
        dout,
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
        bias_init=_torch_bias_init(din) if torch_bias_init else nnx.initializers.zeros_init(),
        rngs=rngs,
    )


def _torch_bias_init(din: int):
    bound = 1 / math.sqrt(din)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class RMSNorm(nnx.Module):
    """Qwen2 RMSNorm: variance and rsqrt in fp32, cast back to the input dtype, then times weight."""

    def __init__(self, dim: int, eps: float, *, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
        return self.scale[...].astype(x.dtype) * normed


def make_stacked(make_layer: Callable[[nnx.Rngs], nnx.Module], num: int, rngs: nnx.Rngs) -> nnx.Module:
    """`num` copies of a layer with every parameter stacked on a leading axis (the scan layout)."""

    @nnx.split_rngs(splits=num)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(r: nnx.Rngs):
        return make_layer(r)

    return create(rngs)


def unstack_layers(layers: nnx.Module) -> list[nnx.Module]:
    """The layers of a stacked module as separate modules, each parameter sliced out once.

    The inference decode loop runs on these: sliced outside its token loop, the per-layer weights
    are plain buffers inside it (slicing the stacks per token made XLA copy every weight matrix of
    every layer for every token on GPU).
    """
    graphdef, state = nnx.split(layers)
    num = jax.tree.leaves(state)[0].shape[0]
    return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(num)]


@jax.custom_vjp
def unstack(a: jax.Array) -> tuple[jax.Array, ...]:
    """The slices a[0], a[1], ... of a layer stack, for the unrolled layers. Their gradient is one
    stack of the per-layer gradients, built once.

    The gradient of plain `a[i]` is that layer's gradient padded to the whole stack, and the stack's
    gradient is the sum of those pads. XLA fuses the 24-deep pad-and-add chain into each consumer
    (the global-norm reductions, the optimizer update), which then evaluates it for every element:
    on an H100 those reductions took 58 ms of the unrolled 0.5B train step (RESULTS.md, session 7).
    """
    return tuple(a[i] for i in range(a.shape[0]))


def _unstack_fwd(a):
    return unstack(a), None


def _unstack_bwd(_, grads):
    # The barrier keeps XLA from fusing the stacking (a 24-operand concatenate) into the consumers.
    return (jax.lax.optimization_barrier(jnp.stack(grads)),)


unstack.defvjp(_unstack_fwd, _unstack_bwd)


@dataclasses.dataclass(frozen=True)
class SplitStack:
    """A layer stack's per-layer parameter states, sliced out once (`split_stack`) for unrolled
    runs. A model that runs its stack in several pieces (between the Manager's injections) splits
    it once per forward pass, so that the stack's gradient is one stack, not one per piece."""

    stacked: nnx.Module  # the stacked module (what `layer_params_transform` is keyed on)
    graphdef: Any
    states: tuple  # per layer, the param state of one layer


def split_stack(layers: nnx.Module) -> SplitStack:
    graphdef, state = nnx.split(layers)
    per_leaf = jax.tree.map(unstack, state)
    num = jax.tree.leaves(state)[0].shape[0]
    is_parts = lambda x: isinstance(x, tuple)
    states = tuple(jax.tree.map(lambda parts, i=i: parts[i], per_leaf, is_leaf=is_parts) for i in range(num))
    return SplitStack(layers, graphdef, states)


def run_stacked(
    layers: nnx.Module | SplitStack | Sequence[nnx.Module],
    carry,
    body: Callable,
    *,
    start: int = 0,
    stop: int | None = None,
    scan: bool = True,
    remat_policy: str = "none",
    xs=None,
    collect: bool = False,
):
    """Applies stacked layers [start, stop) in order: carry = body(layer, carry, x) -> (carry, y).

    With `scan=True` this is one `lax.scan` over the layer axis (one compiled layer body);
    `scan=False` unrolls a Python loop: a longer program without the scan's stacking of saved
    activations. `xs` are per-layer inputs sliced alongside the params (e.g. a KV cache). Returns
    (carry, stacked ys or None).

    `layers` may also be a `SplitStack` (unrolled; a model that runs its stack in pieces passes
    the same one to each), or a sequence of separate layer modules (`unstack_layers`, inference):
    they run unrolled, without remat (which only matters under differentiation).
    """
    if isinstance(layers, (list, tuple)):
        if scan:
            raise ValueError("separate layer modules run unrolled: pass scan=False")
        stop = len(layers) if stop is None else stop
        ys = []
        for i in range(start, stop):
            carry, y = body(layers[i], carry, None if xs is None else jax.tree.map(lambda a: a[i], xs))
            ys.append(y)
        return carry, (jax.tree.map(lambda *a: jnp.stack(a), *ys) if collect and ys else None)
    if isinstance(layers, SplitStack) and scan:
        raise ValueError("a SplitStack runs unrolled: pass scan=False")
    if not scan and not isinstance(layers, SplitStack):
        layers = split_stack(layers)
    if isinstance(layers, SplitStack):
        stacked, graphdef, num = layers.stacked, layers.graphdef, len(layers.states)
    else:
        stacked = layers
        graphdef, state = nnx.split(layers)
        num = jax.tree.leaves(state)[0].shape[0]
    stop = num if stop is None else stop
    if stop <= start:
        return carry, None
    if xs is not None:
        xs = jax.tree.map(lambda a: a[start:stop], xs)

    transform = _LAYER_PARAMS_TRANSFORM.get()

    def step(c, inputs):
        layer_state, x = inputs
        if transform is not None:
            layer_state = transform(stacked, layer_state)
        layer = nnx.merge(graphdef, layer_state)
        c, y = body(layer, c, x)
        return c, (y if collect else None)

    if remat_policy != "none":
        step = jax.checkpoint(step, policy=_REMAT_POLICIES[remat_policy], prevent_cse=not scan)
    if scan:
        return jax.lax.scan(step, carry, (jax.tree.map(lambda a: a[start:stop], state), xs))
    ys = []
    for i in range(stop - start):
        c_in = (layers.states[start + i], None if xs is None else jax.tree.map(lambda a: a[i], xs))
        carry, y = step(carry, c_in)
        ys.append(y)
    stacked_ys = jax.tree.map(lambda *a: jnp.stack(a), *ys) if collect else None
    return carry, stacked_ys
