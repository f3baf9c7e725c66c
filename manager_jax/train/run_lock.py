"""One training run per output directory: an advisory lock (``flock``) on ``<dir>/train.lock``.

Two launches into the same directory (a job submitted twice, a relaunch while the old job still
runs) otherwise both train, overwrite each other's checkpoints and metrics.jsonl, and both exit 0.
The kernel drops the lock when its process ends, however it ends (kill -9 included), so a
relaunch after a crash is never blocked by a stale file; the file only tells who holds it.
On a filesystem without locks the run goes on with a warning.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time

from manager_jax.train.recipe import RecipeError

logger = logging.getLogger(__name__)

LOCK_FILE = "train.lock"
# flock() is not supported there (some FUSE and network filesystems): no lock rather than no run.
_NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunDirectoryInUse(RecipeError):
    """Another training run holds the directory."""


class RunLock:
    """Holds the lock on each of `directories` (created if missing) until `release()`."""

    def __init__(self, directories: list[str]) -> None:
        self._fds: list[int] = []
        try:
            for directory in dict.fromkeys(os.path.abspath(d) for d in directories):
                self._acquire(directory)
        except BaseException:
            self.release()
            raise

    def _acquire(self, directory: str) -> None:
        path = os.path.join(directory, LOCK_FILE)
        try:
            os.makedirs(directory, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:  # refused before anything is built: a wrong or read-only output_dir
            raise RecipeError(f"cannot write into {directory}: {err.strerror} (a read-only file system, no "
                              "permission or a full disk); choose another output_dir (or checkpoint.dir)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirectoryInUse(
                f"{directory} is in use by another training run ({holder}): two runs would overwrite each "
                f"other's checkpoints and metrics. Wait for it to end or stop it, or use another output_dir"
            ) from None
        except OSError as err:
            os.close(fd)
            if err.errno not in _NO_LOCKING:
                raise
            logger.warning("%s: this filesystem has no file locks (%s); nothing stops a second run from writing "
                           "into this directory at the same time", directory, err.strerror)
            return
        # Who holds it, for the message of a refused launch (the lock, not this text, is what counts).
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                   "since": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n").encode(), 0)
        self._fds.append(fd)

    def release(self) -> None:
        for fd in self._fds:
            os.close(fd)  # closing the descriptor releases its flock
        self._fds = []


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
        return f"host {info['host']}, pid {info['pid']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its host and pid are not recorded yet"
