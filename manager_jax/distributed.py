"""Multi-host start-up, in one place (call it before anything touches a JAX backend).

The same `python run.py train ...` runs on one CPU, one GPU, a GPU cluster or every host of a TPU
pod. `initialize()` calls `jax.distributed.initialize` only when the environment describes several
processes:

- explicitly: ``JAX_COORDINATOR_ADDRESS`` (host:port), ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``
  (and optionally ``JAX_LOCAL_DEVICE_IDS``), e.g. several local CPU processes in tests;
- Cloud TPU pods (more than one entry in ``TPU_WORKER_HOSTNAMES``), SLURM jobs with several tasks,
  Open MPI launches: JAX detects the cluster itself.

On CPU, cross-process collectives need gloo (``jax_cpu_collectives_implementation``).

A process that fails ends every process of the job (`exit_on_failure`, `_watch_for_failures`): the
others may be waiting in a collective or barrier it will never reach (inside an Orbax restore, a
train step), and JAX's exit would wait for them at its shutdown barrier.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Sequence

logger = logging.getLogger(__name__)

_initialized = False


class DistributedSetupError(ValueError):
    """The environment describes the processes of a job wrongly (a bad JAX_* variable)."""


def _env_int(name: str, many: bool = False) -> int | list[int]:
    text = os.environ[name]
    try:
        values = [int(x) for x in text.split(",")] if many else [int(text)]
    except ValueError:
        kind = "comma-separated integers" if many else "an integer"
        raise DistributedSetupError(f"{name}={text!r} must be {kind}") from None
    return values if many else values[0]


def cluster_detected(env: dict[str, str] | None = None) -> bool:
    """Whether the environment describes a multi-process job that JAX can auto-detect."""
    env = dict(os.environ if env is None else env)
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return True
    if int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1 and "SLURM_JOB_ID" in env:
        return True
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return True
    return False


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: list[int] | None = None,
    timeout_s: int = 300,
) -> bool:
    """Starts JAX's multi-process runtime when asked or detected; returns whether it did.

    Arguments override the ``JAX_*`` environment variables. Safe to call more than once.
    `timeout_s`: how long a process other than 0 waits for the coordinator to answer.
    """
    global _initialized
    if _initialized:
        return True
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = _env_int("JAX_NUM_PROCESSES")
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = _env_int("JAX_PROCESS_ID")
    if local_device_ids is None and os.environ.get("JAX_LOCAL_DEVICE_IDS"):
        local_device_ids = _env_int("JAX_LOCAL_DEVICE_IDS", many=True)
    explicit = coordinator_address is not None and (num_processes or 1) > 1
    if not explicit and not cluster_detected():
        if num_processes is None and (coordinator_address is not None or process_id is not None):
            # Each host would start alone, as process 0 of 1, and train on its own into the same output_dir.
            given = "JAX_COORDINATOR_ADDRESS" if coordinator_address is not None else "JAX_PROCESS_ID"
            raise DistributedSetupError(f"{given} is set but JAX_NUM_PROCESSES is not: set it to the number of "
                                        "processes of the job (1 for a single process)")
        return False
    if explicit and process_id is None:
        raise DistributedSetupError("JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES are set but JAX_PROCESS_ID is not")
    if explicit and not 0 <= process_id < num_processes:
        raise DistributedSetupError(f"JAX_PROCESS_ID={process_id} must be in 0..{num_processes - 1} "
                                    f"(JAX_NUM_PROCESSES={num_processes})")

    import jax

    # CPU devices exchange data across processes through gloo (the default has no cross-process
    # collectives); the setting only concerns the CPU backend, so GPU/TPU jobs are unaffected.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        if process_id != 0:  # process 0 starts the service itself
            _wait_for_coordinator(coordinator_address, timeout_s)
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=local_device_ids,
            initialization_timeout=timeout_s,
        )
    else:
        jax.distributed.initialize()
    _initialized = True
    if jax.process_count() > 1:
        global _watcher
        _watcher = threading.Thread(target=_watch_for_failures, name="manager_jax-failure-watch", daemon=True)
        _watcher.start()
        atexit.register(_stop_watching)  # runs before JAX's own exit handler (the last registered runs first)
    logger.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )
    return True


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Waits until the coordinator's port accepts connections. JAX's own wait ends, after its
    timeout, in an abort whose message blames a task that died, with a C++ stack trace."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedSetupError(f"JAX_COORDINATOR_ADDRESS={address!r} must be host:port")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=min(5.0, timeout_s)).close()
            return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise DistributedSetupError(
                    f"the coordinator at {address} did not answer within {timeout_s:.0f} s ({err}): start process 0 "
                    "there, or check JAX_COORDINATOR_ADDRESS and that the port is open between the hosts"
                ) from None
            time.sleep(1.0)


def is_primary() -> bool:
    """Process 0 (writes logs, metrics, config files)."""
    import jax

    return jax.process_index() == 0


# Rounds of any_process(), numbered alike in every process because every process makes the same calls.
_vote_rounds = itertools.count()
_VOTE_PREFIX = "manager_jax/any_process"


def any_process(flags: Sequence[bool], *, timeout_s: float = 3600.0) -> tuple[bool, ...]:
    """Each flag OR-ed over all processes. Every process must call it, in the same order.

    The vote goes through the key-value store and a barrier of JAX's coordination service: host
    RPCs (about 1.5 ms per vote for two local processes). A device all-gather would run behind the
    steps already queued on the device, so the host would wait for them, which undoes the training
    loop's one-step-ahead dispatch. The barrier id is reused every round (the service lets a
    completed barrier run again) and each process deletes its key of the round before, so a long
    run leaves no state behind in the coordinator.
    """
    import jax

    flags = tuple(bool(f) for f in flags)
    if jax.process_count() == 1:
        return flags
    from jax._src import distributed as jax_distributed  # the client of jax.distributed.initialize()

    client = jax_distributed.global_state.client
    if client is None:
        raise RuntimeError("several JAX processes but no jax.distributed client: call manager_jax.distributed.initialize()")
    me, count = jax.process_index(), jax.process_count()
    round_ = next(_vote_rounds)
    client.key_value_set(f"{_VOTE_PREFIX}/{round_}/{me}", "".join("1" if f else "0" for f in flags))
    try:
        client.wait_at_barrier(_VOTE_PREFIX, int(timeout_s * 1000))
    except Exception as e:  # the runtime's own error type differs between jax versions
        raise RuntimeError(
            f"process {me}: not every one of the {count} processes reached vote {round_} within {timeout_s:.0f} s "
            f"(a process died, hangs, or runs a different program): {e}"
        ) from e
    votes = [value for _, value in client.key_value_dir_get(f"{_VOTE_PREFIX}/{round_}/")]
    if len(votes) != count or any(len(v) != len(flags) for v in votes):
        raise RuntimeError(f"vote {round_}: expected {count} votes of {len(flags)} flags, got {votes}")
    if round_:
        # Every process read round_ - 1 before it entered this round's barrier.
        client.key_value_delete(f"{_VOTE_PREFIX}/{round_ - 1}/{me}")
    return tuple(any(v[i] == "1" for v in votes) for i in range(len(flags)))


# A failing process writes "<process> <exit status>" under each other process's key of this
# prefix; each process's watcher waits on its own (a process wakes its own at exit).
_FAILURE_PREFIX = "manager_jax/failed/"
_SEEN_PREFIX = "manager_jax/failure_seen/"
_leaving = threading.Event()  # this process ends (on its own failure, or exits): its watcher stands down
_watcher: threading.Thread | None = None


def _client():
    from jax._src import distributed as jax_distributed  # the client of jax.distributed.initialize()

    return jax_distributed.global_state.client


def _leave(status: int, wait_for_others_s: float, message: str | None = None) -> None:
    """Exit now, without JAX's shutdown barrier: it waits for every process, and the others may
    be stuck. Process 0 hosts the coordination service; it leaves last, once every process has
    seen the failure (or after `wait_for_others_s`), so that none loses the service first.
    `message`: printed last, after what the main thread may still print of its own failure."""
    import jax

    client, count = _client(), jax.process_count()
    deadline = time.monotonic() + (wait_for_others_s if jax.process_index() == 0 else 0)
    while time.monotonic() < deadline:
        try:
            if len(client.key_value_dir_get(_SEEN_PREFIX)) >= count:
                time.sleep(0.5)  # the others exit right after they wrote theirs
                break
        except Exception:  # the service is gone
            break
        time.sleep(0.1)
    if message:
        print(message, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def exit_on_failure(status: int, *, wait_for_others_s: float = 10.0) -> None:
    """Called by a process that is about to end with a failure `status` (1 or 2): every other
    process of the job stops within seconds with the same status, wherever it waits, and this one
    exits (it does not return). A no-op with one process."""
    import jax

    if _watcher is None or _client() is None:
        return
    _failing.set()
    if not _claim():  # the watcher is ending the process on another's failure
        threading.Event().wait()
    me, client = jax.process_index(), _client()
    for key, value in [(_SEEN_PREFIX + str(me), "failed")] + [
            (f"{_FAILURE_PREFIX}{p}", f"{me} {int(status)}") for p in range(jax.process_count()) if p != me]:
        try:
            client.key_value_set(key, value)
        except Exception:  # another process failed first (the key exists), or the service is gone
            pass
    _leave(status, wait_for_others_s)


_claim_lock = threading.Lock()
# The main thread ends on its own error: it reports that error (all processes do when they fail
# together after a vote), not another process's note that came at the same time.
_failing = threading.Event()


def _claim() -> bool:
    """Whether this thread is the first to end the process (the watcher, the main thread's
    failure and the exit handler may race)."""
    with _claim_lock:
        if _leaving.is_set():
            return False
        _leaving.set()
        return True


def _announcement(note: str) -> tuple[int, str]:
    """(exit status, error line) for another process's failure note."""
    import jax

    process, _, status = note.partition(" ")
    return int(status) if status.isdigit() else 1, (
        f"error: process {process} of {jax.process_count()} failed (exit status {status}; its log says why); "
        f"process {jax.process_index()} stops too")


def _watch_for_failures() -> None:
    """In each process: when another one reports a failure, say so and exit with its status."""
    import jax

    me, client = jax.process_index(), _client()
    while not _leaving.is_set():
        try:
            note = client.blocking_key_value_get(f"{_FAILURE_PREFIX}{me}", 60_000)
        except Exception:  # not set within the minute: wait again
            continue
        if _leaving.is_set() or _failing.wait(timeout=2.0) or not _claim():  # it exits, or fails itself
            return
        status, message = _announcement(note)
        try:
            client.key_value_set(_SEEN_PREFIX + str(me), "stopped")
        except Exception:
            pass
        _leave(status, 10.0, message)


def _stop_watching() -> None:
    """At a normal exit, before JAX's handler shuts the client down: wake the watcher and wait for
    it. A thread still inside the client's blocking call when the interpreter finalises aborts the
    process ("FATAL: exception not rethrown")."""
    import jax

    if _watcher is None or not _claim():
        return
    try:
        _client().key_value_set(f"{_FAILURE_PREFIX}{jax.process_index()}", "exit")
    except Exception:  # a failure note is already there: the watcher has woken
        pass
    _watcher.join(timeout=5.0)
