"""benchmarks/gpu_deviceless.py compiling the 0.5B decode loop for a TPU chip (libtpu, no TPU)."""

import os
import re
import subprocess
import sys

import pytest

from manager_jax.train.aot import libtpu_available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.skipif(not libtpu_available(), reason="libtpu is not installed (pip install libtpu; not in requirements.txt)")
def test_tpu_decode_loop_writes_no_cache_sized_copies(tmp_path):
    """Per decoded token the TPU program streams the weights into VMEM and writes little else: the
    two [24, 1, 4224, 2, 64] caches (26 MB each) are updated one slot at a time, never copied."""
    out = subprocess.run(
        [sys.executable, "benchmarks/gpu_deviceless.py", "--what", "decode", "--topology", "v5p:2x2x1",
         "--decode-attention", "xla", "--out", str(tmp_path / "decode.hlo")],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
        env={**os.environ, "TPU_WORKER_HOSTNAMES": "localhost", "JAX_PLATFORMS": "cpu"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {m.group(1): float(m.group(3)) for m in re.finditer(r"^\| \**([^|*]+?)\** \| \**([\d,]+)\** \| \**([\d.]+)\** \|$",
                                                                 out.stdout, re.M)}
    assert 0.3 < rows["copy to VMEM (prefetch)"] < 1.1, out.stdout  # the decoder's weights, 0.72 GB
    assert rows["all"] - rows["copy to VMEM (prefetch)"] < 0.05, out.stdout
