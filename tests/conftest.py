"""Shared pytest setup.

Eight fake CPU devices let the sharding tests build real meshes on one machine. XLA reads the flag
once, when the backend starts, so it must be set before anything imports jax.
"""

from __future__ import annotations

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()


def pytest_configure(config) -> None:
    """Registers the `slow` marker (also declared in pyproject.toml) so `-m slow` never warns."""
    config.addinivalue_line("markers", "slow: long tests (real shapes, multi-process, AOT); run with -m slow")
