"""The persistent compilation cache that run.py turns on, and the CPU thread pools it widens (manager_jax/platform.py)."""

import json
import os
import subprocess
import sys

import pytest

from manager_jax.platform import only_cpu_with_libtpu, widen_cpu_thread_pools

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
n = int(os.environ.get("PROBE_SIZE", "64"))  # another size: another program
first = jax.jit(f)(jnp.ones((n, n)))
jax.clear_caches()
second = jax.jit(f)(jnp.ones((n, n)))
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


def test_entries_written_without_the_size_cap_do_not_break_a_capped_cache(tmp_path):
    """JAX without a size cap writes entries without the access-time files that a capped cache
    (run.py's) reads at every write: use_compilation_cache restores them, so the capped process still
    writes its programs instead of warning at each compile."""
    mine = str(tmp_path / "shared")
    probe({"JAX_COMPILATION_CACHE_DIR": mine, "JAX_COMPILATION_CACHE_MAX_SIZE": "-1"}, tmp_path)
    uncapped = set(os.listdir(mine))
    assert any(n.endswith("-cache") for n in uncapped) and not any(n.endswith("-atime") for n in uncapped)
    result, err = probe({"JAX_COMPILATION_CACHE_DIR": mine, "PROBE_SIZE": "32"}, tmp_path)
    assert "Error writing persistent compilation cache entry" not in err
    written = [n for n in result["files"] if n.endswith("-cache") and n not in uncapped]
    assert written and result["hits"] >= 1
    assert all(n[: -len("-cache")] + "-atime" in result["files"] for n in result["files"] if n.endswith("-cache"))


# How many threads XLA:CPU's pool of a fresh interpreter has, after run.py's start-up (tsl names
# them tf_XLAEigen; the collectives of a step wait on these threads).
POOL_PROBE = r"""
import os, sys, jax, jax.numpy as jnp
import run
try:
    run.main(["train", "--help"])  # run.py's start-up, then argparse's help exits
except SystemExit:
    pass
jax.block_until_ready(jnp.ones(4) + 1)  # starts the CPU backend
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print(jax.device_count(), names.count("tf_XLAEigen"))
"""


def pool_threads(env_updates: dict[str, str]) -> tuple[int, int]:
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", "NPROC", "XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env.update(JAX_PLATFORMS="cpu", **env_updates)
    out = subprocess.run([sys.executable, "-c", POOL_PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    devices, threads = out.stdout.split()[-2:]
    return int(devices), int(threads)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through Linux's /proc")
def test_run_py_gives_fake_cpu_devices_four_pool_threads_each():
    """XLA's own size, max(cores, devices), let the Manager step's collectives on 8 fake devices
    take every thread and hang (widen_cpu_thread_pools)."""
    devices, threads = pool_threads({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert devices == 8 and threads == max(os.cpu_count(), 32)
    # The user's own size is kept.
    assert pool_threads({"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PJRT_NPROC": "12"}) == (8, 12)


def test_thread_pool_size_follows_the_device_count_and_leaves_one_device_alone():
    env = {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=2 "
                        "--xla_force_host_platform_device_count=16"}  # XLA takes the last
    assert widen_cpu_thread_pools(env) == max(os.cpu_count(), 64) and env["PJRT_NPROC"] == str(max(os.cpu_count(), 64))
    env = {"JAX_NUM_CPU_DEVICES": "4"}
    assert widen_cpu_thread_pools(env) == max(os.cpu_count(), 16)
    for env in ({}, {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}, {"JAX_NUM_CPU_DEVICES": "1"},
                {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "NPROC": "3"}):
        before = dict(env)
        assert widen_cpu_thread_pools(env) is None and env == before


LIBTPU_PROBE = r"""
import sys, jax
if sys.argv[1] == "run.py":
    import run
    try:
        run.main(["train", "--help"])  # run.py's start-up, then argparse's help exits
    except SystemExit:
        pass
print(jax.devices()[0].platform)
"""


@pytest.mark.skipif(not only_cpu_with_libtpu({}), reason="needs libtpu installed on a host without accelerators")
def test_run_py_starts_jax_without_libtpus_false_error():
    """libtpu installed for ahead-of-time TPU compiles, on a CPU host: JAX starts it with its other
    backends, and libtpu printed an INVALID_ARGUMENT error at every command (this process's own
    libtpu would hold the lock file that keeps another quiet: the children may load it again)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TPU_WORKER_HOSTNAMES", "TPU_SKIP_MDS_QUERY", "JAX_PLATFORMS")}
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
    runs = {how: subprocess.run([sys.executable, "-c", LIBTPU_PROBE, how], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=120) for how in ("run.py", "jax alone")}
    assert all(out.returncode == 0 and out.stdout.split()[-1] == "cpu" for out in runs.values())
    assert "INVALID_ARGUMENT" in runs["jax alone"].stderr  # what run.py's start-up keeps away
    assert "INVALID_ARGUMENT" not in runs["run.py"].stderr and "libtpu" not in runs["run.py"].stderr.lower()


def test_the_users_platform_choice_keeps_libtpu():
    for env in ({"JAX_PLATFORMS": "tpu,cpu"}, {"TPU_WORKER_HOSTNAMES": "h1,h2"}, {"JAX_FORCE_TPU_INIT": "1"}):
        assert only_cpu_with_libtpu(env) is False
