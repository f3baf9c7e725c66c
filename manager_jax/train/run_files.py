"""The run's own small files (recipe.json, the checkpoints' config.json, metrics.jsonl rewritten on
resume): written whole or not at all; and why a write into the run's directories failed, in words a
user acts on (disk full, quota, file size limit), with the error that stops a run for it (exit 1,
`manager_jax/exit_status.py`)."""

from __future__ import annotations

import contextlib
import errno
import os
import re


def write_atomically(path: str, text: str) -> None:
    """`path` holds `text` whole, or what it held before: written beside it and renamed. The
    temporary file goes when the write fails or is interrupted (a full disk, a SIGTERM)."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


class WriteFailed(RuntimeError):
    """A file of the run (a checkpoint, metrics.jsonl, ...) could not be written."""


# Tensorstore (Orbax's array writer) raises ValueError with the OS error code in its message.
_TENSORSTORE_OS_CODE = re.compile(r"os_error_code='?(\d+)")


def os_error_code(err: BaseException) -> int | None:
    """The OS error number behind `err` (itself, what it was raised from, or in its text), or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno:
            return err.errno
        match = _TENSORSTORE_OS_CODE.search(str(err))
        if match:
            return int(match.group(1))
        err = err.__cause__ or err.__context__
    return None


def cause(err: BaseException) -> str:
    """'No space left on device (ENOSPC)' for an OS error, else the exception's type and last line."""
    code = os_error_code(err)
    if code is not None:
        return f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[-1]}" if lines else type(err).__name__
