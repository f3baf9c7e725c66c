"""The train step's AdamW update (global-norm clip, AdamW, the non-finite skip) over layer stacks
against the same parameters stored one array per layer, compiled for an H100 without one attached.

    python benchmarks/optimizer_layout.py      # in the venv of benchmarks/gpu_deviceless.py

Prints the launches and bytes written of both programs (benchmarks/hlo_traffic.py). The question
it answers: would storing unrolled layers unstacked (no stacking of their gradients, no slicing of
their weights) pay for the update's extra launches? Qwen2-0.5B's layer shapes, 24 layers.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host runs nothing; XLA only compiles for the target

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from benchmarks import hlo_traffic  # noqa: E402
from benchmarks.gpu_deviceless import target_devices  # noqa: E402

LAYERS = 24
SHAPES = {"gate": (896, 4864), "up": (896, 4864), "down": (4864, 896), "o": (896, 896), "q_bias": (896,),
          "norm": (896,)}


def params(per_layer: bool, sharding) -> dict:
    one = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)
    if per_layer:
        return {k: tuple(one(s) for _ in range(LAYERS)) for k, s in SHAPES.items()}
    return {k: one((LAYERS, *s)) for k, s in SHAPES.items()}


def update_step(tx=None):
    """The update as manager_jax/train/step.py runs it: the global norm, the optimizer, the skip
    of a non-finite step. step(params, bf16 grads, opt_state) -> (params, opt_state)."""
    tx = tx or optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-5, weight_decay=0.0))

    def step(p, g, opt):
        g = jax.tree.map(lambda x: x.astype(jnp.float32), g)
        finite = jnp.isfinite(optax.tree.norm(g))
        updates, new_opt = tx.update(g, opt, p)
        keep = lambda new, old: jnp.where(finite, new, old)
        return jax.tree.map(keep, optax.apply_updates(p, updates), p), jax.tree.map(keep, new_opt, opt)

    return tx, step


def update_program(per_layer: bool, device) -> str:
    tx, step = update_step()
    sharding = jax.sharding.SingleDeviceSharding(device)
    p = params(per_layer, sharding)
    grads = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16, sharding=sharding), p)
    opt = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), jax.eval_shape(tx.init, p))
    return jax.jit(step, donate_argnums=(0, 2)).lower(p, grads, opt).compile().as_text()


def main() -> None:
    device = target_devices()[0]
    print("| layout | launches | elementwise | reduction | GB written |")
    print("|---|---|---|---|---|")
    for per_layer in (False, True):
        found = hlo_traffic.launches(update_program(per_layer, device))
        count = lambda kind=None: sum(x.count for x in found if kind is None or x.kind == kind)
        written = sum(x.bytes_written * x.count for x in found) / 1e9
        print(f"| {'one array per layer' if per_layer else 'layer stacks'} | {count()} | {count('elementwise')} | "
              f"{count('reduction')} | {written:.2f} |")


if __name__ == "__main__":
    main()
