"""What the training loop's per-step agreement of processes costs while a step runs on the device.

    python benchmarks/process_vote.py [--processes 2] [--rounds 100] [--step-ms 50] [--host-ms 10]

Starts local CPU processes with jax.distributed. Each round stands for a step of the training
loop: --host-ms of host work (placing the batch), the dispatch of about --step-ms of device work
(the step), a wait for the previous round's work (reading its metrics), and the vote. It times the
vote made two ways:

- `any_process`: manager_jax.distributed.any_process, host RPCs through the coordination service
  (what the loop uses);
- `allgather`: jax.experimental.multihost_utils.process_allgather of the flags, a device
  collective (what the loop used before), which runs behind the queued work.

Prints one JSON line (from process 0): per way, the median milliseconds of the vote call and the
mean milliseconds per round. A vote that waits for the queued step leaves the device idle during
the next round's host work: rounds take step + host time instead of the larger of the two.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _worker(args: argparse.Namespace) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils

    from manager_jax import distributed

    distributed.initialize()

    def allgather(flags):
        gathered = np.asarray(multihost_utils.process_allgather(np.asarray(flags, np.int32)))
        return tuple(bool(x) for x in gathered.reshape(-1, len(flags)).any(axis=0))

    @jax.jit
    def step(x, n):
        return jax.lax.fori_loop(0, n, lambda i, x: jnp.tanh(x @ x), x)

    x = jax.device_put(jnp.full((256, 256), 1.0 / 256, jnp.float32), jax.local_devices()[0])
    step(x, 1).block_until_ready()
    # Iterations that take about --step-ms here, agreed by all processes (the slowest one's count).
    t = time.perf_counter()
    step(x, 50).block_until_ready()
    per_iter_ms = (time.perf_counter() - t) * 1e3 / 50
    iters = int(np.asarray(multihost_utils.process_allgather(np.int32(max(1, args.step_ms / per_iter_ms)))).min())
    allgather((False,))  # compiled

    report = {"processes": jax.process_count(), "rounds": args.rounds, "host_ms": args.host_ms, "step_ms": None}
    for name, vote in (("any_process", distributed.any_process), ("allgather", allgather)):
        vote((False,))  # together
        vote_ms, previous = [], None
        start = time.perf_counter()
        for r in range(args.rounds):
            time.sleep(args.host_ms / 1e3)
            queued = step(x, iters)
            if previous is not None:
                previous.block_until_ready()
            previous = queued
            t = time.perf_counter()
            agreed = vote((r % 7 == jax.process_index(),))
            vote_ms.append((time.perf_counter() - t) * 1e3)
            assert agreed == (r % 7 < jax.process_count(),), (r, agreed)
        previous.block_until_ready()
        report[name] = {
            "vote_ms": round(statistics.median(vote_ms), 3),
            "round_ms": round((time.perf_counter() - start) * 1e3 / args.rounds, 3),
        }
    step_ms = []
    # The queued work alone, for scale.
    for _ in range(5):
        t = time.perf_counter()
        step(x, iters).block_until_ready()
        step_ms.append((time.perf_counter() - t) * 1e3)
    report["step_ms"] = round(statistics.median(step_ms), 3)
    if jax.process_index() == 0:
        print(json.dumps(report), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--step-ms", type=float, default=50.0, help="device work queued before each vote")
    parser.add_argument("--host-ms", type=float, default=10.0, help="host work before each dispatch")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(args.processes),
               PROCESS_VOTE_WORKER="1")
    cmd = [sys.executable, os.path.abspath(__file__), "--rounds", str(args.rounds), "--step-ms", str(args.step_ms),
           "--host-ms", str(args.host_ms)]
    procs = [subprocess.Popen(cmd, cwd=REPO, env={**env, "JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(args.processes)]
    outputs = [p.communicate(timeout=args.timeout) for p in procs]
    for i, (p, (_, err)) in enumerate(zip(procs, outputs)):
        if p.returncode != 0:
            print(f"process {i} failed:\n{err[-3000:]}", file=sys.stderr)
            return 1
    print(outputs[0][0].strip().splitlines()[-1])
    return 0


if __name__ == "__main__":
    if os.environ.get("PROCESS_VOTE_WORKER"):
        parser = argparse.ArgumentParser()
        parser.add_argument("--rounds", type=int)
        parser.add_argument("--step-ms", type=float)
        parser.add_argument("--host-ms", type=float)
        _worker(parser.parse_args())
    else:
        sys.exit(main())
