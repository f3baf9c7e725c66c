"""Exit statuses, one convention for every command (`run.py ...`, `python -m tools.convert_weights ...`,
`python -m tools.prepare_data ...`).

A launch script or scheduler can then tell "fix the command" from "the work failed" from
"relaunch me" without parsing messages:

- 0: done;
- 1 (FAILED): the work ran and failed, or the check it exists for failed: a training run aborted
  on non-finite losses, a compiled program that does not fit the chip, `verify` above its
  thresholds, a checkpoint `inspect` cannot read, a record `inspect-data --strict` rejects;
- 2 (BAD_INPUT): refused before anything was computed or written: usage errors, a missing or
  damaged file, a wrong recipe, override, checkpoint, prompt or mesh;
- 130 (INTERRUPTED): Ctrl-C; 128 + N for signal N (a preempted training run exits 143 after its
  checkpoint).
"""

from __future__ import annotations

import gc
import os
import signal
import threading

OK = 0
FAILED = 1
BAD_INPUT = 2
INTERRUPTED = 130

# Signals that end a process without running its `finally` blocks (SIGINT raises KeyboardInterrupt).
EXIT_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class ExitOnSignal:
    """While active (main thread only), SIGTERM / SIGHUP raise SystemExit(128 + signal), so `finally`
    / `except BaseException` blocks run (a temporary file removed, a lock released) and the process
    exits with that status, without a traceback."""

    def __enter__(self):
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in EXIT_SIGNALS:
                self.previous[sig] = signal.signal(sig, self._raise)
        return self

    # How soon a signal that came inside a garbage collector's callback or a __del__ comes again.
    RETRY_S = 0.05

    @classmethod
    def _raise(cls, signum, frame):
        if _drops_exceptions(frame):
            # Raised here, the exit would be printed as "Exception ignored in ..." with a
            # traceback, and dropped: the process went on (jax's gc callback runs at every
            # collection, often while a run sets up). The signal comes again once that code returned.
            threading.Timer(cls.RETRY_S, os.kill, (os.getpid(), signum)).start()
            return
        raise SystemExit(128 + signum)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


def _drops_exceptions(frame, depth: int = 64) -> bool:
    """Whether `frame` runs inside code whose exceptions Python prints and drops: a garbage
    collector callback (`gc.callbacks`) or a finaliser (`__del__`)."""
    callbacks = {getattr(callback, "__code__", None) for callback in gc.callbacks}
    while frame is not None and depth > 0:
        if frame.f_code in callbacks or frame.f_code.co_name == "__del__":
            return True
        frame, depth = frame.f_back, depth - 1
    return False
