"""The platform the programs are built for.

The model and the engine make their "auto" choices (cuDNN or XLA attention, two-row decode, the
Pallas decode kernels, rows padded for flash attention) by platform. That is the host's backend,
except while a program is compiled ahead of time for other devices (`run.py compile` for a TPU
pod or a GPU cluster from a CPU host): then it is the target's.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("target_platform", default=None)


@contextlib.contextmanager
def compiling_for(platform: str) -> Iterator[None]:
    """Inside, `target_platform()` answers `platform` ("gpu", "tpu", "cpu")."""
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)


def target_platform() -> str:
    """The platform of the programs being built: the innermost `compiling_for`, else the backend."""
    return _TARGET.get() or jax.default_backend()
