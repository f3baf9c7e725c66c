"""benchmarks/gpu_deviceless.py compiling the 0.5B decode loop for a TPU chip (libtpu, no TPU), and
for a GPU card from the XLA dump a GPU session brought back (jax's CUDA plugin, no GPU)."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from manager_jax.train.aot import libtpu_available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.skipif(not libtpu_available(), reason="libtpu is not installed (pip install 'jax[tpu]==<this jax>'; not in requirements.txt)")
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
    rows = {m.group(1): float(m.group(3)) for m in re.finditer(r"^\| \**([^|*]+?)\** \| \**([\d,]+)\** \| \**([\d.]+)\** \|(?: \**[\d.]+\** \|)?$",
                                                                 out.stdout, re.M)}
    assert 0.3 < rows["copy to VMEM (prefetch)"] < 1.1, out.stdout  # the decoder's weights, 0.72 GB
    assert rows["all"] - rows["copy to VMEM (prefetch)"] < 0.05, out.stdout


def _deviceless(*args, env=None):
    return subprocess.run([sys.executable, "benchmarks/gpu_deviceless.py", "--what", "decode", "--rows", "2",
                           "--top", "0", *args], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})


def _cuda_plugin_installed() -> bool:
    try:  # find_spec raises, not returns None, when the jax_plugins namespace itself is missing
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _cuda_plugin_installed(),
                    reason='needs the CUDA plugin of this jax (pip install "jax[cuda12]==<jax version>")')
def test_card_dump_describes_the_card_and_requires_its_autotune_picks(tmp_path):
    """A dump as gpu_session.sh keeps it (here of a compile without a GPU, so the autotuner picked
    nothing): --card-dump compiles for the card it describes, refuses a program whose fusions the
    card did not tune, and with --allow-missing-autotune compiles the program of the dump."""
    dump = tmp_path / "xla_dump" / "generate_jax"
    first = _deviceless("--topology", "h200:1", "--out", str(tmp_path / "first.hlo"),
                        env={"XLA_FLAGS": f"--xla_dump_to={dump} --xla_dump_hlo_module_re=jit__decode_loop_fn"})
    assert first.returncode == 0, first.stderr[-3000:]
    configs = list(dump.glob("*gpu_target_config.pbtxt"))
    assert configs and 'device_description_str: "NVIDIA H200"' in configs[0].read_text()

    strict = _deviceless("--card-dump", str(tmp_path / "xla_dump"), "--out", str(tmp_path / "strict.hlo"))
    assert strict.returncode != 0 and "the card tuned no fusion like one of this program" in strict.stderr, \
        strict.stderr[-3000:]
    assert "Traceback" not in strict.stderr

    loose = _deviceless("--card-dump", str(tmp_path / "xla_dump"), "--allow-missing-autotune",
                        "--out", str(tmp_path / "loose.hlo"))
    assert loose.returncode == 0, loose.stderr[-3000:]
    # The H200's description, not --topology's default H100: the same program as the dump's compile.
    assert (tmp_path / "loose.hlo").read_text() == (tmp_path / "first.hlo").read_text()
