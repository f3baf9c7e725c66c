"""benchmarks/profile_summary.py: busy and idle time, kinds and gaps of a program's kernels."""

import jax
import jax.numpy as jnp
import pytest

from benchmarks.profile_summary import Kernel, device_kernels, kind_of, main, summarize


def test_busy_idle_kinds_and_gaps():
    us = 1_000.0
    kernels = [
        Kernel("nvjet_sm90_tst_128x224", 0 * us, 10 * us),  # matmul 0-10
        Kernel("input_reduce_fusion_3", 5 * us, 10 * us),  # overlaps: busy until 15
        Kernel("memcpy128", 16 * us, 4 * us),  # 1 us gap
        Kernel("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 25 * us, 5 * us),  # 5 us gap
        Kernel("loop_multiply_fusion_7", 530 * us, 10 * us),  # 500 us gap
    ]
    s = summarize(kernels, "jit_step")
    assert s.kernels == 5
    assert s.span_ns == pytest.approx(540 * us)
    assert s.busy_ns == pytest.approx((15 + 4 + 5 + 10) * us)
    assert s.idle_ns == pytest.approx((1 + 5 + 500) * us)
    assert s.by_kind == pytest.approx({"matmul": 10 * us, "reduction": 10 * us, "other fusion": 10 * us,
                                       "attention": 5 * us, "copy / memset": 4 * us})
    assert s.gaps == [("0-2 us", 1, pytest.approx(1 * us)), ("2-10 us", 1, pytest.approx(5 * us)),
                      (">= 100 us", 1, pytest.approx(500 * us))]
    assert s.top[0][0] in ("nvjet_sm90_tst_128x224", "input_reduce_fusion_3", "loop_multiply_fusion_7")
    assert kind_of("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm>") == "matmul"
    assert kind_of("gemm_fusion_dot_149") == "matmul"
    # our Pallas kernels, by the names their pallas_calls give them
    assert [kind_of(n) for n in ("decode_attention", "decode_attention_combine", "decode_matmul_norm_qkv",
                                 "decode_matmul_add", "decode_matmul_norm_gated")] == ["attention"] * 2 + ["matmul"] * 3


def test_a_profile_without_a_device_plane_is_a_clear_error(tmp_path, capsys):
    from benchmarks.profiling import capture_xplane

    f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
    x = jnp.ones((64, 64))
    path = capture_xplane(lambda: f(x), str(tmp_path / "cpu.xplane.pb"), calls=1)
    assert path is not None
    with pytest.raises(ValueError, match="no GPU or TPU device plane"):
        device_kernels(path)
    assert main([path]) == 2
    assert "no GPU or TPU device plane" in capsys.readouterr().err
