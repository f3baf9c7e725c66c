"""benchmarks/profiling.py: one xplane file where asked, and a failure that never raises."""

import os

import jax
import jax.numpy as jnp

from benchmarks.profiling import capture_xplane


def test_capture_writes_one_xplane_file(tmp_path):
    f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
    x = jnp.ones((64, 64))
    out = tmp_path / "a" / "run.xplane.pb"
    assert capture_xplane(lambda: f(x), str(out), calls=2) == str(out)
    assert out.stat().st_size > 0
    assert os.listdir(tmp_path / "a") == ["run.xplane.pb"]  # no profiler folders left beside it


def test_capture_failure_is_reported_not_raised(tmp_path, capsys):
    def broken():
        raise RuntimeError("device lost")

    assert capture_xplane(broken, str(tmp_path / "x.xplane.pb")) is None
    assert "profile: failed (RuntimeError: device lost)" in capsys.readouterr().err
    assert not (tmp_path / "x.xplane.pb").exists()
