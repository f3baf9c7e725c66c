"""One pool of threads for the host's share of the work around the device: numpy and PIL release
the GIL in their loops (gathers, JPEG decoding, resizing), so their work splits over cores without
processes. Made on first use; a forked child makes its own (the parent's threads do not come along,
and a pool that believes it has them never runs a task)."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

MAX_THREADS = 8

_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def _forget() -> None:
    global _pool, _lock
    _pool, _lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget)


def size() -> int:
    """The pool's threads: a thread per core, at most MAX_THREADS."""
    return max(1, min(MAX_THREADS, os.cpu_count() or 1))


def pool() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=size(), thread_name_prefix="manager_jax_host")
        return _pool
