"""Helper for tests of code that Grain's read threads share."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Sequence


def run_racing(target: Callable[..., None], args_per_thread: Sequence[tuple]) -> None:
    """Runs one thread per args tuple at once, switching between threads as often as the
    interpreter allows, so that a race on shared state shows up within a short test."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=target, args=args) for args in args_per_thread]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
