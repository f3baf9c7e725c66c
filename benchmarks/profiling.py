"""Capture a device profile of a few calls into one .xplane.pb file (for xprof, read off the device).

The device call returns files at most two folders under $OUT, while `jax.profiler.trace` writes
`<dir>/plugins/profile/<run>/<host>.xplane.pb`: the trace goes to a temporary folder and its one
xplane file is copied to the path asked for. Profiling is an extra: a failure prints a line and
never costs the benchmark its result.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import tempfile
from typing import Callable


def capture_xplane(fn: Callable[[], object], out_path: str, calls: int = 2) -> str | None:
    """Run `fn` `calls` times under the JAX profiler; the xplane file lands at `out_path`."""
    import jax

    try:
        with tempfile.TemporaryDirectory() as tmp:
            with jax.profiler.trace(tmp):
                for _ in range(calls):
                    jax.block_until_ready(fn())
            found = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
            if not found:
                print(f"profile: no xplane file written under {tmp}", file=sys.stderr)
                return None
            os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
            shutil.copyfile(found[0], out_path)
            print(f"profile: {calls} calls -> {out_path} ({os.path.getsize(out_path) / 2**20:.1f} MiB)", file=sys.stderr)
            return out_path
    except Exception as e:  # noqa: BLE001 - a profiler failure must not lose the timing already printed
        print(f"profile: failed ({type(e).__name__}: {e})", file=sys.stderr)
        return None
