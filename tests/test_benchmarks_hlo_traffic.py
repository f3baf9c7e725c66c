"""benchmarks/hlo_traffic.py on programs compiled here: loop bodies count once per iteration, and
a dynamic-update-slice counts the slice it writes, not the buffer it writes into."""

import jax
import jax.numpy as jnp

from benchmarks.hlo_traffic import array_bytes, launches, table


def _scan_program(length: int) -> str:
    def f(x, w):
        def layer(c, wi):
            c = jnp.tanh(c @ wi)
            return c, c * 2.0  # one [64, 64] f32 slice per iteration into a [length, 64, 64] stack
        return jax.lax.scan(layer, x, w)

    return jax.jit(f).lower(jnp.ones((64, 64)), jnp.ones((length, 64, 64))).compile().as_text()


def test_loop_bodies_count_per_iteration():
    short, long = launches(_scan_program(3)), launches(_scan_program(6))
    per_kind = lambda found, kind: sum(l.count for l in found if l.kind == kind)
    assert per_kind(short, "matmul") == 3 and per_kind(long, "matmul") == 6
    # The stacked outputs: each iteration writes one 16 KiB slice, whatever the stack's length.
    updates = [l for l in long if l.kind == "dynamic-update-slice (in place)"]
    assert updates and all(l.bytes_written == 64 * 64 * 4 for l in updates)
    assert sum(l.count * l.bytes_written for l in updates) == 6 * 64 * 64 * 4
    assert table(long)[-1].startswith("| **all** | **")


def test_array_bytes_adds_up_tuples():
    assert array_bytes("bf16[2,3]{1,0}") == 12
    assert array_bytes("(f32[4]{0}, pred[8]{0}, s32[])") == 16 + 8 + 4
