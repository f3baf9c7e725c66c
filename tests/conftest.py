"""Shared pytest setup.

Eight fake CPU devices let the sharding tests build real meshes on one machine. XLA reads the flag
once, when the backend starts, so it must be set before anything imports jax.

XLA:CPU's thread pools get 4 threads per device (`manager_jax.platform.widen_cpu_thread_pools`).

The persistent compilation cache (which `run.py` turns on) goes to a folder of this session,
shared by the tests' subprocesses and removed at the end, not to the user's cache.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile

import pytest

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="manager_jax_tests_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

from manager_jax.platform import widen_cpu_thread_pools  # noqa: E402  (after XLA_FLAGS, before the backend starts)

widen_cpu_thread_pools()  # the 8 devices' collectives can deadlock XLA:CPU's default thread pools


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
