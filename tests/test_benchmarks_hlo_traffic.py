"""benchmarks/hlo_traffic.py on programs compiled here: loop bodies count once per iteration, and
a dynamic-update-slice counts the slice it writes, not the buffer it writes into; reads count the
slices of stacks."""

import os
import re

import jax
import jax.numpy as jnp
import pytest

from benchmarks.hlo_traffic import array_bytes, launches, table, trip_count
from manager_jax.train.aot import libtpu_available


def _scan_fn(x, w):
    def layer(c, wi):
        c = jnp.tanh(c @ wi)
        return c, c * 2.0  # one [64, 64] f32 slice per iteration into a [length, 64, 64] stack
    return jax.lax.scan(layer, x, w)


def _scan_program(length: int) -> str:
    return jax.jit(_scan_fn).lower(jnp.ones((64, 64)), jnp.ones((length, 64, 64))).compile().as_text()


def test_loop_bodies_count_per_iteration():
    short, long = launches(_scan_program(3)), launches(_scan_program(6))
    per_kind = lambda found, kind: sum(l.count for l in found if l.kind == kind)
    assert per_kind(short, "matmul") == 3 and per_kind(long, "matmul") == 6
    # The stacked outputs: each iteration writes one 16 KiB slice, whatever the stack's length.
    updates = [l for l in long if l.kind == "dynamic-update-slice (in place)"]
    assert updates and all(l.bytes_written == 64 * 64 * 4 for l in updates)
    assert sum(l.count * l.bytes_written for l in updates) == 6 * 64 * 64 * 4
    assert table(long)[-1].startswith("| **all** | **")


def test_bytes_read_per_iteration_do_not_grow_with_the_stacks():
    """Each iteration reads its layer's weights out of the input stack and writes one slice into
    the output stack: both count a slice (counted whole, the reads would grow with the length)."""
    def in_loop(length):
        return [l for l in launches(_scan_program(length)) if l.loop_depth]

    short, long = in_loop(3), in_loop(6)
    assert sum(l.bytes_read for l in short) == sum(l.bytes_read for l in long)
    slice_bytes = 64 * 64 * 4
    for kind in ("dynamic-slice copy", "dynamic-update-slice (in place)"):
        (stack_op,) = [l for l in long if l.kind == kind]
        assert slice_bytes <= stack_op.bytes_read <= slice_bytes + 8  # the slice and its index


def test_array_bytes_adds_up_tuples():
    assert array_bytes("bf16[2,3]{1,0}") == 12
    assert array_bytes("(f32[4]{0}, pred[8]{0}, s32[])") == 16 + 8 + 4


def test_trip_counts_are_read_from_the_loop_where_xla_does_not_annotate_them():
    """TPU programs carry no `known_trip_count`: the count comes from the `counter < N` condition
    (here a CPU program with the annotation removed; its compare sits in a fusion and its counter
    starts as a copied constant)."""
    for length in (3, 6):
        stripped = re.sub(r'"known_trip_count":\{"n":"\d+"\},?', "", _scan_program(length))
        assert "known_trip_count" not in stripped
        assert sum(l.count for l in launches(stripped) if l.kind == "matmul") == length
    # A condition that is not `counter < constant` leaves the body counted once.
    comps = {"main": ["%t = (s32[]) tuple(%c)", "%c = s32[] constant(0)"],
             "cond": ["%p = (s32[]) parameter(0)", "%i = s32[] get-tuple-element(%p), index=0",
                      "ROOT %r = pred[] compare(%i, %i), direction=LT"]}
    assert trip_count(comps, "main", "%w = (s32[]) while(%t), condition=%cond, body=%body") == 1
    comps["cond"][-1:] = ["%n = s32[] constant(10)", "ROOT %r = pred[] compare(%n, %i), direction=GT"]
    comps["main"][1] = "%c = s32[] constant(4)"
    assert trip_count(comps, "main", "%w = (s32[]) while(%t), condition=%cond, body=%body") == 6


def test_custom_call_outputs_aliasing_operands_are_written_in_place():
    """A kernel that updates a buffer it was given (here a [4, 1024] f32 cache) writes its other
    outputs only; the same call without the aliasing writes the buffer whole."""
    call = ('  ROOT %k = (f32[8]{0}, f32[4,1024]{1,0}) custom-call(f32[8]{0} %a, f32[4,1024]{1,0} %c), '
            'custom_call_target="__gpu$xla.gpu.triton"{aliasing}, api_version=API_VERSION_TYPED_FFI')
    program = lambda aliasing: ("HloModule m\n\nENTRY %main (a: f32[8], c: f32[4,1024]) -> (f32[8], f32[4,1024]) {\n"
                                "  %a = f32[8]{0} parameter(0)\n  %c = f32[4,1024]{1,0} parameter(1)\n"
                                + call.replace("{aliasing}", aliasing) + "\n}\n")
    [aliased] = launches(program(", output_to_operand_aliasing={{1}: (1, {})}"))
    [whole] = launches(program(""))
    assert aliased.bytes_written == 8 * 4
    assert whole.bytes_written == 8 * 4 + 4 * 1024 * 4


def test_cublas_gemms_reading_slices_in_place_are_matmuls_without_their_workspace():
    """XLA's dynamic-slice fusion: a cuBLAS GEMM reading one layer of a weight stack in place. It is a
    matmul, and writes its [64, 32] bf16 result, not its s8 scratch space."""
    program = """HloModule m

%dynamic-slice-fusion (p0: bf16[4,16,32], p1: bf16[64,16]) -> (bf16[64,32], s8[4096]) {
  %p1 = bf16[64,16]{1,0} parameter(1)
  %p0 = bf16[4,16,32]{2,1,0} parameter(0)
  %slice.1 = bf16[1,16,32]{2,1,0} slice(%p0), slice={[2:3], [0:16], [0:32]}
  %bitcast.1 = bf16[16,32]{1,0} bitcast(%slice.1)
  ROOT %custom-call.1 = (bf16[64,32]{1,0}, s8[4096]{0}) custom-call(%p1, %bitcast.1), custom_call_target="__cublas$lt$matmul"
}

ENTRY %main (w: bf16[4,16,32], x: bf16[64,16]) -> (bf16[64,32], s8[4096]) {
  %w = bf16[4,16,32]{2,1,0} parameter(0)
  %x = bf16[64,16]{1,0} parameter(1)
  ROOT %dynamic_slice_fusion = (bf16[64,32]{1,0}, s8[4096]{0}) fusion(%w, %x), kind=kCustom, calls=%dynamic-slice-fusion
}
"""
    [gemm] = launches(program)
    assert gemm.kind == "matmul" and gemm.bytes_written == 64 * 32 * 2


def test_tpu_unfused_updates_and_async_copies_count_what_they_write():
    """TPU programs (instructions as libtpu writes them): a dynamic-update-slice that is not fused
    writes its update in place, and an async copy's output tuple (destination, source, context)
    writes only its destination; a copy into VMEM (memory space S(1)) is a prefetch."""
    program = """HloModule m

ENTRY %main (c: bf16[24,1,4224,2,64], u: bf16[1,1,1,2,64], w: bf16[896,4864], i: s32[]) -> (bf16[24,1,4224,2,64], bf16[896,4864], bf16[896,4864]) {
  %c = bf16[24,1,4224,2,64]{2,4,3,1,0:T(8,128)(2,1)} parameter(0)
  %u = bf16[1,1,1,2,64]{2,4,3,1,0:T(8,128)(2,1)} parameter(1)
  %w = bf16[896,4864]{1,0:T(8,128)(2,1)} parameter(2)
  %i = s32[] parameter(3)
  %z = s32[] constant(0)
  %dus = bf16[24,1,4224,2,64]{2,4,3,1,0:T(8,128)(2,1)} dynamic-update-slice(%c, %u, %z, %z, %i, /*index=5*/%z, %z), metadata={op_name="jit(f)/dynamic_update_slice"}
  %copy-start.1 = (bf16[896,4864]{1,0:T(8,128)(2,1)S(1)}, bf16[896,4864]{1,0:T(8,128)(2,1)}, u32[]{:S(2)}) copy-start(%w)
  %copy-done.1 = bf16[896,4864]{1,0:T(8,128)(2,1)S(1)} copy-done(%copy-start.1)
  %copy-start.2 = (bf16[896,4864]{1,0:T(8,128)(2,1)}, bf16[896,4864]{1,0:T(8,128)(2,1)}, u32[]{:S(2)}) copy-start(%w)
  %copy-done.2 = bf16[896,4864]{1,0:T(8,128)(2,1)} copy-done(%copy-start.2)
  ROOT %t = (bf16[24,1,4224,2,64]{2,4,3,1,0:T(8,128)(2,1)}, bf16[896,4864]{1,0:T(8,128)(2,1)S(1)}, bf16[896,4864]{1,0:T(8,128)(2,1)}) tuple(%dus, %copy-done.1, %copy-done.2)
}
"""
    update, prefetch, copy = launches(program)
    assert update.kind == "dynamic-update-slice (in place)" and update.bytes_written == 2 * 64 * 2
    assert prefetch.kind == "copy to VMEM (prefetch)" and prefetch.bytes_written == 896 * 4864 * 2
    assert copy.kind == "copy" and copy.bytes_written == 896 * 4864 * 2


@pytest.mark.skipif(not libtpu_available(), reason="libtpu is not installed (pip install 'jax[tpu]==<this jax>'; not in requirements.txt)")
def test_tpu_scan_program_writes_the_same_per_iteration_whatever_the_stack_length():
    """The scan of the first test compiled for a TPU chip by libtpu (which folds the stacked
    output's update into the matmul's fusion): each iteration writes a few [64, 64] f32 arrays,
    whether the stack has 6 or 24 layers."""
    import subprocess
    import sys

    code = (
        "import jax, jax.numpy as jnp\n"
        "from manager_jax.train.aot import topology_devices\n"
        "from tests.test_benchmarks_hlo_traffic import _scan_fn\n"
        "from benchmarks.hlo_traffic import launches\n"
        "s = jax.sharding.SingleDeviceSharding(topology_devices('v5p:2x2x1')[0])\n"
        "for n in (6, 24):\n"
        "    args = [jax.ShapeDtypeStruct(shape, jnp.float32, sharding=s) for shape in ((64, 64), (n, 64, 64))]\n"
        "    found = launches(jax.jit(_scan_fn).lower(*args).compile().as_text())\n"
        "    print(sum(l.count * l.bytes_written for l in found if l.loop_depth) / n)\n"
    )
    env = {**os.environ, "TPU_WORKER_HOSTNAMES": "localhost", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    per_iteration_6, per_iteration_24 = map(float, out.stdout.split()[-2:])
    assert per_iteration_6 == per_iteration_24 <= 4 * 64 * 64 * 4
