"""Shared pytest setup.

Eight fake CPU devices let the sharding tests build real meshes on one machine. XLA reads the flag
once, when the backend starts, so it must be set before anything imports jax.

XLA:CPU's thread pools get 4 threads per device (`manager_jax.platform.widen_cpu_thread_pools`).

The persistent compilation cache (which `run.py` turns on) goes to a folder of this session (one
per pytest-xdist worker), shared by the tests' subprocesses and removed at the end, not to the
user's cache.

The suite runs on pytest-xdist workers by default (`-n auto --dist loadfile` in pyproject.toml:
the tests of a file share one worker and its module fixtures); `-n 0` runs it in this process.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile

import pytest

# Eight devices; and LLVM's optimisation level 0 for XLA:CPU's kernels: the tests' programs are
# small, their time goes to compiling them (about a fifth less in all), and the level should
# change no result (XLA:CPU's default keeps LLVM from reordering floating-point arithmetic).
for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
_OWN_CACHE = "MANAGER_JAX_TESTS_XLA_CACHE"
if "JAX_COMPILATION_CACHE_DIR" not in os.environ or (_OWN_CACHE in os.environ and "PYTEST_XDIST_WORKER" in os.environ):
    # pytest-xdist workers inherit the controller's folder and each make their own inside it: two
    # processes evicting from one jax cache race (a warning per entry lost).
    _CACHE = tempfile.mkdtemp(prefix="manager_jax_tests_xla_cache_", dir=os.environ.get(_OWN_CACHE))
    os.environ.setdefault(_OWN_CACHE, _CACHE)  # the controller's (or a run without workers)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
# Every test process caps the cache, as run.py's commands do (platform.CACHE_MAX_BYTES): an uncapped
# process writes entries without the access-time files that a capped one (a test's run.py
# subprocess) reads at each write, and the capped one's writes then fail while the test runs.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 * 2**30))

from manager_jax.platform import widen_cpu_thread_pools  # noqa: E402  (after XLA_FLAGS, before the backend starts)

widen_cpu_thread_pools()  # the 8 devices' collectives can deadlock XLA:CPU's default thread pools


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (the default, pyproject.toml): a worker per core, at most one per 6 GiB of
    available memory (a worker holding the default run's compiled programs peaks near 6 GiB), or
    per 16 GiB when the run may take slow tests (0.5B shapes, several processes each)."""
    per_worker = (6 if config.getoption("markexpr", "") == "not slow" else 16) << 30
    available = 0
    try:
        with open("/proc/meminfo") as meminfo:
            available = next(int(line.split()[1]) << 10 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass  # not Linux: one worker per core
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, available // per_worker)) if available else cores


def pytest_configure(config) -> None:
    """Registers the `slow` marker (also declared in pyproject.toml) so `-m slow` never warns."""
    config.addinivalue_line("markers", "slow: long tests (real shapes, multi-process, AOT); run with -m slow")


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """Commands run in-process (`run.main`, `compile-generate`'s `main`) set up logging
    (`manager_jax.log_setup`): the root logger's level, and a handler on the stderr of the test, which
    `capsys` closes after it. Left there, every later record is a "--- Logging error ---" traceback
    in some other test's stderr."""
    root = logging.getLogger()
    level = root.level
    yield
    root.setLevel(level)
    for handler in root.handlers[:]:
        if isinstance(handler, logging.StreamHandler) and getattr(handler.stream, "closed", False):
            root.removeHandler(handler)
