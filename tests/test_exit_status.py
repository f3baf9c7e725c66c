"""manager_jax.exit_status.ExitOnSignal: SIGTERM exits with 143 through the program's cleanup,
also when the signal comes while Python runs code whose exceptions it drops."""

import os
import signal
import subprocess
import sys

PROBE = r"""
import gc, os, signal, sys, time
from manager_jax import exit_status

sent = []

def collecting(phase, info):  # a gc callback, like the one jax registers
    if phase == "start" and not sent:
        sent.append(1)
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs here, between these bytecodes
            pass

class Finalised:
    def __del__(self):
        if sys.argv[1] == "del":
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):
                pass

try:
    with exit_status.ExitOnSignal():
        if sys.argv[1] == "gc":
            gc.callbacks.append(collecting)
            gc.collect()
        else:
            Finalised()  # dropped at once: its __del__ runs
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            time.sleep(0.001)
    print("not stopped")
finally:
    print("cleanup ran")
"""


def _run(where: str) -> subprocess.CompletedProcess:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-c", PROBE, where], cwd=root, capture_output=True, text=True, timeout=60)


def test_a_sigterm_inside_a_gc_callback_or_a_finaliser_still_exits_143_through_the_cleanup():
    for where in ("gc", "del"):
        out = _run(where)
        assert out.returncode == 128 + signal.SIGTERM, (where, out.stdout, out.stderr)
        assert out.stdout.split() == ["cleanup", "ran"] and "Exception ignored" not in out.stderr, (where, out.stderr)
