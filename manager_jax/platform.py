"""The platform the programs are built for, and where their compiled forms are kept.

The model and the engine make their "auto" choices (cuDNN or XLA attention, two-row decode, the
Pallas decode kernels, rows padded for flash attention) by platform. That is the host's backend,
except while a program is compiled ahead of time for other devices (`run.py compile` for a TPU
pod or a GPU cluster from a CPU host): then it is the target's.

`widen_cpu_thread_pools` sizes XLA:CPU's thread pools for several fake CPU devices before the
backend starts (the default size can deadlock a step's collectives; see there).

`use_compilation_cache` turns on JAX's persistent compilation cache for the `run.py` commands and
the lmms-eval adapter, so a relaunched run (after a preemption, say) loads its compiled programs
instead of compiling them again.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
import tempfile
from collections.abc import Iterator

import jax

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "JAX_COMPILATION_CACHE_DIR"  # JAX's own variable: set (even empty) = the user's choice
CACHE_MAX_BYTES = 16 * 2**30  # least recently used programs are dropped beyond this

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


CPU_THREADS_PER_DEVICE = 4
_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def widen_cpu_thread_pools(environ: dict[str, str] | None = None) -> int | None:
    """With N > 1 CPU devices (XLA_FLAGS' ``--xla_force_host_platform_device_count`` or
    ``JAX_NUM_CPU_DEVICES``), sets ``PJRT_NPROC`` to max(cores, 4 N); returns it, or None when
    left alone (one device, or ``PJRT_NPROC`` / ``NPROC`` already set: the user's choice).

    XLA:CPU sizes its thread pools to max(cores, N), one thread per device, but its thunk executor
    runs a device's independent collectives (one beside a loop that holds others) at once, each
    holding a pool thread while it waits for its peers. With every thread held by a waiting
    collective, the devices those wait for get no thread: the step hangs until the rendezvous
    times out. On a 2-core host, the Manager train step on fsdp=2 x tensor=4 with 8 batch shards
    hung so in 3 of 5 runs of the same program (8 threads); with 4 threads per device it ran every
    time. PJRT_NPROC is read once, when the backend starts: call this before that.
    """
    env = os.environ if environ is None else environ
    if "PJRT_NPROC" in env or "NPROC" in env:
        return None
    found = _DEVICE_COUNT_FLAG.findall(env.get("XLA_FLAGS", ""))
    devices = int(found[-1]) if found else 1  # XLA takes the last of repeated flags
    if env.get("JAX_NUM_CPU_DEVICES", "").strip().isdigit():
        devices = max(devices, int(env["JAX_NUM_CPU_DEVICES"]))
    if devices <= 1:
        return None
    threads = max(os.cpu_count() or 1, CPU_THREADS_PER_DEVICE * devices)
    env["PJRT_NPROC"] = str(threads)
    return threads


def only_cpu_with_libtpu(environ: dict[str, str] | None = None) -> bool:
    """Whether libtpu is installed on a host that has no accelerator (no TPU chip, NVIDIA or AMD
    GPU, as JAX's own device scans see them) and nothing asks for a platform: `run.py` then starts
    JAX on the CPU alone (`jax_platforms="cpu"`, what it falls back to there anyway).

    libtpu is installed on CPU hosts for ahead-of-time TPU compiles (`run.py compile --topology
    v5p:...`, which builds its TPU devices without the TPU backend). Started with JAX's other
    backends, libtpu asks the cloud metadata server for its hosts and, off the cloud, printed an
    ``INVALID_ARGUMENT ... TPU_WORKER_HOSTNAMES`` error and a source trace at every command (unless
    another process held libtpu's lock file). ``JAX_PLATFORMS``, ``TPU_WORKER_HOSTNAMES`` and
    ``JAX_FORCE_TPU_INIT`` are the user's say and leave it as it is.
    """
    import importlib.util

    env = os.environ if environ is None else environ
    if any(env.get(name) for name in ("JAX_PLATFORMS", "TPU_WORKER_HOSTNAMES", "JAX_FORCE_TPU_INIT")):
        return False
    if importlib.util.find_spec("libtpu") is None:
        return False
    try:  # JAX's own scans (what its Cloud TPU and GPU plugin set-ups read); private, hence the guard
        from jax._src import hardware_utils as hw

        return not (hw.num_available_tpu_chips_and_device_id()[0] or hw.has_visible_nvidia_gpu()
                    or hw.num_available_amd_gpus(stop_at=1))
    except (ImportError, AttributeError, OSError, TypeError):
        return False


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "manager_jax", "jax_compilation_cache")


def use_compilation_cache() -> str | None:
    """Keep compiled programs in a persistent cache; returns its folder, or None when off.

    Call it once the processes are started (`distributed.initialize`) and before the first compile.
    The folder is ``$JAX_COMPILATION_CACHE_DIR`` when that is set (empty: no cache), else
    :func:`default_cache_dir` for a run of one process; a run of several processes goes without
    unless the variable names a folder: there only process 0 writes the cache, and with CPU
    processes (gloo collectives) a process that loaded its programs from the cache while another
    compiled them broke the first collective after a resume (tests/test_train_multiprocess.py).
    Only programs that took over a second to compile are kept, at most ``CACHE_MAX_BYTES`` on a
    local disk.
    """
    if CACHE_DIR_ENV in os.environ:
        path = os.environ[CACHE_DIR_ENV].strip()
        if not path:
            return None
    elif jax.process_count() > 1:
        logger.info("compilation cache off: %d processes (set %s to a folder they all see to turn it on)",
                    jax.process_count(), CACHE_DIR_ENV)
        return None
    else:
        path = default_cache_dir()
    if "://" not in path:
        try:  # a read-only home must not stop a run: go without the cache
            os.makedirs(path, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as err:
            logger.warning("compilation cache off: cannot write to %s (%s); set %s to another folder",
                           path, err, CACHE_DIR_ENV)
            return None
        if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
            jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
        if jax.config.jax_compilation_cache_max_size != -1:
            restore_cache_access_times(path)
    jax.config.update("jax_compilation_cache_dir", path)
    return path


# JAX's size-capped cache keeps, beside each entry "<key>-cache", its last use in "<key>-atime".
_ENTRY_SUFFIX, _ACCESS_TIME_SUFFIX = "-cache", "-atime"


def restore_cache_access_times(path: str) -> int:
    """Give every entry of a cache folder that lacks one the access-time file JAX's size cap reads;
    returns how many were missing.

    Each write to a capped cache first reads the access time of every entry, and one missing file
    fails it: the whole cache then warns "Error writing persistent compilation cache entry ...
    FileNotFoundError" at every compile and keeps nothing new. An entry lacks the file when JAX
    without a cap wrote it (the folder shared with another program, or JAX_COMPILATION_CACHE_MAX_SIZE=-1
    in some processes) or when a process was killed between its two writes. The entry's own
    modification time stands in for its last use.
    """
    try:
        import filelock  # what JAX's capped cache locks the folder with (it needs the package too)
    except ImportError:
        return 0
    try:
        names = set(os.listdir(path))
        missing = [n[: -len(_ENTRY_SUFFIX)] for n in names
                   if n.endswith(_ENTRY_SUFFIX) and n[: -len(_ENTRY_SUFFIX)] + _ACCESS_TIME_SUFFIX not in names]
        if not missing:
            return 0
        with filelock.FileLock(os.path.join(path, ".lockfile"), timeout=10):
            for key in missing:
                entry, stamp = (os.path.join(path, key + suffix) for suffix in (_ENTRY_SUFFIX, _ACCESS_TIME_SUFFIX))
                if os.path.exists(entry) and not os.path.exists(stamp):
                    with open(stamp, "wb") as f:
                        f.write(os.stat(entry).st_mtime_ns.to_bytes(8, "little"))
    except (OSError, filelock.Timeout) as err:  # a cache that cannot be mended must not stop a run
        logger.warning("compilation cache %s: could not restore its entries' access times (%s)", path, err)
        return 0
    logger.info("compilation cache %s: restored the access times of %d entries", path, len(missing))
    return len(missing)
