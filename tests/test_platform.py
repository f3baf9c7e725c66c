"""The persistent compilation cache that run.py turns on (manager_jax/platform.py)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# In a fresh interpreter (the cache is process-wide JAX config): turn the cache on, compile one
# program twice with JAX's in-memory caches cleared in between, report what happened.
PROBE = r"""
import json, os, jax, jax.numpy as jnp
from manager_jax.platform import use_compilation_cache
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
path = use_compilation_cache()
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
f = lambda x: jnp.sin(x) @ jnp.cos(x).T
first = jax.jit(f)(jnp.ones((64, 64)))
jax.clear_caches()
second = jax.jit(f)(jnp.ones((64, 64)))
print(json.dumps({
    "path": path, "config": jax.config.jax_compilation_cache_dir,
    "files": sorted(os.listdir(path)) if path and os.path.isdir(path) else [],
    "hits": events.count("/jax/compilation_cache/cache_hits"), "same": bool((first == second).all()),
}))
"""


def probe(env_updates, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "XDG_CACHE_HOME")}
    env.update(HOME=str(tmp_path / "home"), **env_updates)
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def test_default_folder_is_under_the_users_cache_and_a_second_compile_hits_it(tmp_path):
    result, _ = probe({"XDG_CACHE_HOME": str(tmp_path / "xdg")}, tmp_path)
    assert result["path"] == str(tmp_path / "xdg" / "manager_jax" / "jax_compilation_cache")
    assert result["config"] == result["path"]
    assert result["files"] and result["hits"] >= 1 and result["same"]


def test_the_users_folder_wins_and_empty_turns_the_cache_off(tmp_path):
    mine = str(tmp_path / "mine")
    result, _ = probe({"JAX_COMPILATION_CACHE_DIR": mine}, tmp_path)
    assert result["path"] == mine and result["files"] and result["hits"] >= 1
    result, _ = probe({"JAX_COMPILATION_CACHE_DIR": ""}, tmp_path)
    assert result["path"] is None and result["hits"] == 0
    assert not (tmp_path / "home" / ".cache").exists()


def test_a_folder_that_cannot_be_made_turns_the_cache_off_with_a_warning(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result, err = probe({"JAX_COMPILATION_CACHE_DIR": str(blocker / "cache")}, tmp_path)
    assert result["path"] is None and result["hits"] == 0
    assert "compilation cache off: cannot write to" in err
