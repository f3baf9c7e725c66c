"""Attention dispatch: the blocked XLA path equals one full softmax, with masks of every shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from manager_jax.models import attention as A


def _naive(q, k, v, mask):
    """Plain per-head softmax attention in numpy (GQA by repeating k/v)."""
    h, kv = q.shape[2], k.shape[2]
    k, v = np.repeat(k, h // kv, axis=2), np.repeat(v, h // kv, axis=2)
    logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(mask, logits, -1e30)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


@pytest.mark.parametrize("block", [7, 16, 64])
def test_blocked_attention_equals_full_softmax(block, monkeypatch):
    monkeypatch.setattr(A, "QUERY_BLOCK", block)
    rng = np.random.default_rng(0)
    b, t, h, kv, d = 2, 37, 4, 2, 8
    q, k, v = (rng.normal(size=(b, t, n, d)).astype(np.float32) for n in (h, kv, kv))
    seg = np.ones((b, t), np.int32)
    seg[0, 20:] = 2  # two packed segments in row 0
    seg[1, 30:] = 0  # padding in row 1
    slots = jnp.arange(t)
    mask = A.segment_causal_mask(slots, slots, jnp.asarray(seg), jnp.asarray(seg))
    got = A.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=mask, impl="xla")
    np.testing.assert_allclose(np.asarray(got), _naive(q, k, v, np.asarray(mask)), rtol=1e-5, atol=1e-5)
    causal = A.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=None, impl="auto",
                                     plain_causal=True)
    tri = np.tril(np.ones((t, t), bool))[None, None]
    np.testing.assert_allclose(np.asarray(causal), _naive(q, k, v, tri), rtol=1e-5, atol=1e-5)
    # Gradients through the rematerialised blocks equal those of one unblocked softmax.
    loss = lambda fn: jax.grad(lambda x: (fn(x) ** 2).sum())(jnp.asarray(q))
    blocked = loss(lambda x: A.dot_product_attention(x, jnp.asarray(k), jnp.asarray(v), mask=mask))
    full = loss(lambda x: A._xla_attention(x, jnp.asarray(k), jnp.asarray(v), mask, d**-0.5))
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(full), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("t", [64, 99])
def test_padded_flash_attention_equals_the_unpadded_softmax(causal, t):
    """The padding that lets cuDNN take any row length changes no real output, nor its gradients.

    Run through jax.nn's XLA implementation (the same call the GPU path makes with "cudnn").
    """
    rng = np.random.default_rng(1)
    b, h, kv, d = 2, 4, 2, 8
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, d)).astype(np.float32)) for n in (h, kv, kv))
    mask = np.tril(np.ones((t, t), bool))[None, None] if causal else np.ones((1, 1, t, t), bool)
    fn = lambda q, k, v: A.padded_flash_attention(q, k, v, scale=d**-0.5, causal=causal, implementation=None)
    got = fn(q, k, v)
    assert got.shape == q.shape
    np.testing.assert_allclose(np.asarray(got), _naive(*map(np.asarray, (q, k, v)), mask), rtol=1e-5, atol=1e-5)
    w = jnp.asarray(rng.normal(size=q.shape).astype(np.float32))
    grads = jax.grad(lambda *a: (fn(*a) * w).sum(), argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(lambda *a: (A._xla_attention(*a, jnp.asarray(mask), d**-0.5) * w).sum(), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(grads, ref):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5)


def _cpu_attention_mesh():
    from jax.sharding import Mesh

    return A.AttentionMesh(Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor")))


@pytest.mark.parametrize("impl", ["flash", "dispatch", "splash"])
def test_rows_padded_by_the_caller_attend_to_their_real_keys_only(impl):
    """`valid_len`: rows that arrive padded (the vision tower pads its crops once for all layers).
    The padding holds large values for the flash call itself, and NaN for the dispatch, whose
    contract is that nothing in padding rows reaches the real rows or the gradients. "splash": the
    dispatch on a TPU-style mesh (Pallas interpret mode), the unmasked Splash kernel with the
    padding in its own segment."""
    rng = np.random.default_rng(3)
    b, n, t, h, d = (2, 100, 128, 2, 8) if impl == "splash" else (2, 50, 64, 4, 8)
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, h, d)).astype(np.float32)) for _ in range(3))
    if impl == "flash":
        k, v = (x.at[:, n:].multiply(100.0) for x in (k, v))
        fn = lambda q, k, v: A.padded_flash_attention(q, k, v, scale=d**-0.5, causal=False, implementation=None,
                                                      valid_len=n)
    else:
        q, k, v = (x.at[:, n:].set(jnp.nan) for x in (q, k, v))
        dispatch = lambda q, k, v: A.dot_product_attention(q, k, v, mask=None, impl=impl.replace("dispatch", "xla"),
                                                           valid_len=n)
        if impl == "splash":
            def fn(q, k, v):
                with A.sharded_attention(_cpu_attention_mesh()):
                    return dispatch(q, k, v)

            assert "pallas_call" in str(jax.make_jaxpr(fn)(q, k, v))
        else:
            fn = dispatch
    got = fn(q, k, v)
    real = lambda x: np.asarray(x[:, :n])
    np.testing.assert_allclose(real(got), _naive(real(q), real(k), real(v), np.ones((1, 1, n, n), bool)),
                               rtol=1e-5, atol=1e-5)
    if impl == "dispatch":
        assert not np.asarray(got[:, n:]).any()  # padding rows out: zero
    w = jnp.asarray(rng.normal(size=q.shape).astype(np.float32)).at[:, n:].set(0.0)  # padding rows are dropped
    grads = jax.grad(lambda *a: (fn(*a) * w).sum(), argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(lambda *a: (A._xla_attention(*a, None, d**-0.5) * w[:, :n]).sum(), argnums=(0, 1, 2))(
        q[:, :n], k[:, :n], v[:, :n])
    for g, r in zip(grads, ref):
        np.testing.assert_allclose(real(g), np.asarray(r), rtol=1e-4, atol=1e-5)
        assert not np.asarray(g[:, n:]).any()  # nothing flows into the padding


def test_unmasked_rows_are_padded_to_what_the_attention_runs_unpadded():
    assert A.unmasked_row_multiple("cudnn") == A.FLASH_SEQ_MULTIPLE
    assert A.unmasked_row_multiple("xla") == 1
    assert A.unmasked_row_multiple("auto") == (A.FLASH_SEQ_MULTIPLE if jax.default_backend() == "gpu" else 1)
    assert A.unmasked_row_multiple("splash") == 1  # outside a training / inference pass: the XLA path
    with A.sharded_attention(_cpu_attention_mesh()):
        assert A.unmasked_row_multiple("splash") == A.SPLASH_LANES  # Splash (interpret mode on CPU)
        assert A.unmasked_row_multiple("auto") == (A.FLASH_SEQ_MULTIPLE if jax.default_backend() == "gpu" else 1)
        # A row length Splash cannot take runs on the XLA path instead of failing.
        x = jnp.ones((1, 100, 2, 8))
        assert "pallas_call" not in str(jax.make_jaxpr(
            lambda x: A.dot_product_attention(x, x, x, mask=None, impl="splash"))(x))


def test_auto_attention_follows_the_platform_compiled_for_and_what_cudnn_takes():
    """"auto" takes cuDNN on GPU only for 16-bit inputs and head dims it supports: fp32 (the parity
    tests, the CPU demo recipe run on a GPU) took cuDNN and failed. While compiling ahead of time
    for GPUs (`platform.compiling_for`), the choice is the GPU's on any host."""
    from manager_jax.platform import compiling_for, target_platform

    x16, x32 = jnp.ones((1, 64, 2, 16), jnp.bfloat16), jnp.ones((1, 64, 2, 16), jnp.float32)
    with compiling_for("gpu"):
        assert target_platform() == "gpu"
        assert A.unmasked_row_multiple("auto", jnp.bfloat16, 72) == A.FLASH_SEQ_MULTIPLE
        assert A.unmasked_row_multiple("auto", jnp.float32, 72) == 1
        assert A.unmasked_row_multiple("auto", jnp.bfloat16, 20) == 1  # not a multiple of 8
        assert A.unmasked_row_multiple("auto", jnp.bfloat16, 256) == 1
        # fp32 traces the XLA path (no cuDNN call, which would need cuDNN's plugin to trace at all).
        jaxpr = str(jax.make_jaxpr(lambda x: A.dot_product_attention(x, x, x, mask=None, impl="auto"))(x32))
        assert "cudnn" not in jaxpr and "dot_general" in jaxpr
    assert target_platform() == jax.default_backend()
    if jax.default_backend() != "gpu":
        assert A.unmasked_row_multiple("auto", jnp.bfloat16, 64) == 1
        assert "cudnn" not in str(jax.make_jaxpr(lambda x: A.dot_product_attention(x, x, x, mask=None))(x16))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py)")
def test_cudnn_inputs_keep_their_heads_whole_where_the_tensor_axis_does_not_divide_them():
    """cuDNN's partitioner refuses heads split unevenly or in part: 0.5B (14 and 2 heads) on tensor 4
    did not compile for GPUs (`run.py compile --topology h100:8 --set mesh.tensor=4`)."""
    from jax.sharding import Mesh

    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 1, 4), ("data", "fsdp", "tensor"))
    q, k = jnp.ones((4, 8, 8, 16)), jnp.ones((4, 8, 2, 16))  # 8 heads divide 4, 2 KV heads do not
    with A.sharded_attention(A.AttentionMesh(mesh, row_axes=("data",))):
        whole = A._whole_heads_unless_split_evenly(q, k, q)
        assert all(x.sharding.spec == P("data", None, None, None) for x in whole)
        odd_rows = A._whole_heads_unless_split_evenly(q[:3], k[:3])  # 3 rows: not split over data either
        assert all(x.sharding.spec == P(None, None, None, None) for x in odd_rows)
        even = A._whole_heads_unless_split_evenly(q, jnp.ones((4, 8, 4, 16)))
        assert even[0] is q  # both counts divide: left to GSPMD
    assert A._whole_heads_unless_split_evenly(q, k)[0] is q  # no mesh


def test_padded_cudnn_attention_traces_under_vmap():
    """The train step vmaps the model over its shards. The crops' padded cuDNN attention passes
    sequence lengths, and jax's cuDNN batching rule reshapes them to the vmapped batch: constant
    lengths failed to trace on any mesh of more than one shard (a multi-GPU run with images).
    Tracing needs jax's CUDA plugin (cuDNN), not a GPU."""
    q = jnp.zeros((3, 2, 100, 4, 64), jnp.bfloat16)  # [shards, crops, tokens, heads, d]
    f = jax.vmap(lambda x: A.padded_flash_attention(x, x, x, scale=0.125, causal=False, implementation="cudnn",
                                                    valid_len=90))
    try:
        out = jax.eval_shape(f, q)
    except RuntimeError as err:
        if "cuDNN is not detected" in str(err):
            pytest.skip("needs jax's CUDA plugin")
        raise
    assert out.shape == q.shape


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a GPU")
@pytest.mark.parametrize("case", ["causal", "unmasked", "padded_by_the_caller"])
def test_cudnn_attention_equals_the_xla_path_on_gpu(case):
    """The GPU path itself (run by benchmarks/gpu_session.sh first): cuDNN on padded rows against
    the fp32 XLA softmax, outputs and gradients, at the 0.5B shapes (GQA 14/2, head 64; SigLIP's
    729-token crops with 16 heads of 72, also as the tower runs them: padded to 768 with non-zero
    padding rows, where nothing may leak into the real rows and nothing may turn NaN)."""
    rng = np.random.default_rng(2)
    causal = case == "causal"
    b, n, h, kv, d = (2, 1000, 14, 2, 64) if causal else (3, 729, 16, 16, 72)
    t = 768 if case == "padded_by_the_caller" else n
    valid_len = n if t != n else None
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, m, d)), jnp.bfloat16) for m in (h, kv, kv))
    w = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32).at[:, n:].set(0.0)
    mask = jnp.asarray(np.tril(np.ones((n, n), bool)) if causal else np.ones((n, n), bool))[None, None]

    def loss(impl, q, k, v):
        if impl == "cudnn":
            out = A.dot_product_attention(q, k, v, mask=None, impl="cudnn", plain_causal=causal, valid_len=valid_len)
        else:
            out = A._xla_attention(q[:, :n], k[:, :n], v[:, :n], mask, d**-0.5)
        return (out[:, :n].astype(jnp.float32) * w[:, :n]).sum(), out[:, :n]

    results = {impl: jax.jit(jax.value_and_grad(lambda *a, i=impl: loss(i, *a), argnums=(0, 1, 2), has_aux=True))(q, k, v)
               for impl in ("cudnn", "xla")}
    (_, out_c), grads_c = results["cudnn"]
    (_, out_x), grads_x = results["xla"]
    rel = lambda a, b: float(jnp.linalg.norm((a - b).astype(jnp.float32)) / jnp.linalg.norm(b.astype(jnp.float32)))
    assert rel(out_c, out_x) < 2e-2
    for gc, gx in zip(grads_c, grads_x):
        assert bool(jnp.isfinite(gc.astype(jnp.float32)).all())
        assert rel(gc[:, :n], gx[:, :n]) < 3e-2
        assert not bool(gc[:, n:].astype(jnp.float32).any())  # nothing flows into the padding


def test_cudnn_refuses_masks_it_cannot_express():
    x = jnp.zeros((1, 8, 2, 8))
    with pytest.raises(ValueError, match="causal .unpacked. or unmasked"):
        A.dot_product_attention(x, x, x, mask=jnp.ones((1, 1, 8, 8), bool), impl="cudnn")


def _packed_inputs(rows, t, h, kv, d, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=(rows, t, n, d)).astype(np.float32) for n in (h, kv, kv))
    seg = np.ones((rows, t), np.int32)
    seg[0, 50:170] = 2  # three packed segments in row 0, padding at its end
    seg[0, 170:230] = 3
    seg[0, 230:] = 0
    return q, k, v, seg


def test_splash_kernel_equals_the_reference_on_packed_rows():
    """The TPU Splash kernel (Pallas interpret mode on CPU): packed segments, padding, GQA, gradients."""
    from jax.sharding import Mesh

    b, t, h, kv, d = 2, 256, 4, 2, 16
    q, k, v, seg = _packed_inputs(b, t, h, kv, d)
    slots = jnp.arange(t)
    mask = np.asarray(A.segment_causal_mask(slots, slots, jnp.asarray(seg), jnp.asarray(seg)))
    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    with A.sharded_attention(A.AttentionMesh(mesh)):
        assert A.splash_applies("splash", t) and not A.splash_applies("auto", t)  # auto: TPU meshes only
        with pytest.raises(ValueError, match="multiple of 128"):
            A.splash_applies("splash", t + 8)
        splash = lambda q, k, v: A.splash_attention(q, k, v, jnp.asarray(seg))
        got = splash(*map(jnp.asarray, (q, k, v)))
        np.testing.assert_allclose(np.asarray(got), _naive(q, k, v, mask), rtol=1e-4, atol=1e-5)
        loss = lambda fn: jax.grad(lambda *x: (fn(*x) ** 2).sum(), argnums=(0, 1, 2))(*map(jnp.asarray, (q, k, v)))
        reference = lambda q, k, v: A._xla_attention(q, k, v, jnp.asarray(mask), d**-0.5)
        for a, r in zip(loss(splash), loss(reference)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-4, atol=1e-4)
    assert not A.splash_applies("splash", t)  # outside the training pass: the XLA path


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py)")
def test_splash_on_a_mesh_keeps_shards_and_heads_in_place():
    """vmap over shards (spmd_axis_name) + shard_map over heads, as the train step runs it."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    shards, b, t, h, kv, d = 4, 1, 256, 4, 2, 16
    parts = [_packed_inputs(b, t, h, kv, d, seed=s) for s in range(shards)]
    q, k, v, seg = (np.stack([p[i] for p in parts]) for i in range(4))
    spread = NamedSharding(mesh, P(("data", "fsdp")))
    args = [jax.device_put(jnp.asarray(x), spread) for x in (q, k, v, seg)]

    def step(q, k, v, seg):
        with A.sharded_attention(A.AttentionMesh(mesh)):
            return jax.vmap(A.splash_attention, spmd_axis_name=("data", "fsdp"))(q, k, v, seg)

    compiled = jax.jit(step).lower(*args).compile()
    out = compiled(*args)
    assert "all-gather" not in compiled.as_text()  # no activation moves between devices
    assert out.sharding.spec == P(("data", "fsdp"), None, None, "tensor")
    slots = jnp.arange(t)
    for i in range(shards):
        mask = np.asarray(A.segment_causal_mask(slots, slots, jnp.asarray(seg[i]), jnp.asarray(seg[i])))
        np.testing.assert_allclose(np.asarray(out[i]), _naive(q[i], k[i], v[i], mask), rtol=1e-4, atol=1e-5)


def _kernel_calls(jaxpr) -> list[str]:
    """Names of the fused attention kernel calls in a jaxpr, nested jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            found.append(str(eqn.params["name"]))
        elif eqn.primitive.name.startswith("dot_product_attention_"):
            found.append(eqn.primitive.name)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _kernel_calls(inner)
    return found


def _stacked_attention_grad_jaxpr(attend, remat_policy: str, t: int = 128):
    """The gradient jaxpr of two stacked layers (q/k/v projections + `attend`) run by
    `run_stacked` under `remat_policy`, as the model's layer scans run them."""
    from flax import nnx

    from manager_jax.models.layers import make_stacked, run_stacked

    h, kv, d = 4, 2, 16

    class Layer(nnx.Module):
        def __init__(self, rngs):
            self.qkv = nnx.Linear(h * d, (h + 2 * kv) * d, rngs=rngs)

        def __call__(self, x):
            q, k, v = jnp.split(self.qkv(x), [h * d, (h + kv) * d], axis=-1)
            split = lambda y, n: y.reshape(*y.shape[:2], n, d)
            return x + attend(split(q, h), split(k, kv), split(v, kv)).reshape(x.shape)

    layers = make_stacked(Layer, 2, nnx.Rngs(0))
    graphdef, state = nnx.split(layers)

    def loss(state, x):
        body = lambda layer, c, _: (layer(c), None)
        out, _ = run_stacked(nnx.merge(graphdef, state), x, body, remat_policy=remat_policy)
        return (out**2).sum()

    return jax.make_jaxpr(jax.grad(loss))(state, jnp.ones((1, t, h * d), jnp.float32)).jaxpr


def test_remat_dots_keeps_the_splash_forward_for_the_backward():
    """Under remat "dots" the backward pass reuses the Splash forward's outputs instead of running
    the kernel again (jax's plain checkpoint_dots policy reruns it in every layer)."""
    from jax.sharding import Mesh

    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    seg = jnp.ones((1, 128), jnp.int32)
    with A.sharded_attention(A.AttentionMesh(mesh)):
        calls = _kernel_calls(_stacked_attention_grad_jaxpr(lambda q, k, v: A.splash_attention(q, k, v, seg), "dots"))
    forward = [c for c in calls if "fwd" in c]
    backward = [c for c in calls if "dq" in c or "dkv" in c]
    assert len(forward) == 1 and len(backward) == 2, calls  # one scan body each way


def test_remat_dots_keeps_the_cudnn_forward_for_the_backward(monkeypatch):
    """The same for cuDNN flash attention. Only traced, never run: jax's cuDNN presence checks are
    stubbed so that the jaxpr can be built on a machine without a GPU."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    monkeypatch.setattr(cudnn, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(cudnn, "check_compute_capability", lambda *a: True)
    bf16 = lambda y: y.astype(jnp.bfloat16)
    attend = lambda q, k, v: A.dot_product_attention(bf16(q), bf16(k), bf16(v), mask=None, impl="cudnn",
                                                     plain_causal=True).astype(q.dtype)
    calls = {policy: _kernel_calls(_stacked_attention_grad_jaxpr(attend, policy)) for policy in ("dots", "full")}
    assert calls["dots"].count("dot_product_attention_fwd_wrapper") == 1, calls["dots"]
    assert calls["dots"].count("dot_product_attention_bwd_wrapper") == 1, calls["dots"]
    # Remat "full" recomputes the layer, so there the forward kernel runs again in the backward.
    assert calls["full"].count("dot_product_attention_fwd_wrapper") == 2, calls["full"]


def _saved_per_layer(jaxpr) -> list[tuple]:
    """Shapes of what the forward layer scans stack for the backward pass (their ys)."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan" and not eqn.params["reverse"]:
            if "num_carry" in eqn.params:  # jax 0.10: the carries, then the ys
                ys = eqn.outvars[eqn.params["num_carry"]:]
            else:  # jax 0.11 describes them otherwise: the stacked outputs, one row per layer (the carry here is not)
                ys = [v for v in eqn.outvars if v.aval.shape[:1] == (eqn.params["length"],)]
            shapes += [tuple(v.aval.shape) for v in ys]
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                shapes += _saved_per_layer(inner)
    return shapes


def test_remat_dots_does_not_keep_the_xla_paths_attention_scores():
    """The XLA attention path's [T, S] scores are recomputed, not saved per layer: on the 0.5B
    train step (XLA attention, CPU) they made the "dots" policy need 103 GiB of temporaries
    instead of 27 (benchmarks/RESULTS.md)."""
    t = 256  # every other per-layer activation here holds fewer than T * T elements
    attend = lambda q, k, v: A.dot_product_attention(q, k, v, mask=None, impl="xla", plain_causal=True)
    saved = _saved_per_layer(_stacked_attention_grad_jaxpr(attend, "dots", t=t))
    assert saved, "the layer scan saved nothing: the check below would pass vacuously"
    assert not [s for s in saved if np.prod(s[1:]) >= t * t], saved
