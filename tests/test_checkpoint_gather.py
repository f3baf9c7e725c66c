"""The data states of every shard, gathered from two real processes (jax.distributed, CPU) at each
checkpoint of a long run: right, and without compiling a program per checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.test_train_multiprocess import REPO, _env, _free_port


def test_gathering_states_that_grow_over_a_run_compiles_a_few_programs_not_one_per_checkpoint():
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.checkpoint_gather_worker"], cwd=REPO,
            env=_env(1, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    for out, _ in outputs:
        report = json.loads(out.strip().splitlines()[-1])
        for checkpoint, states in enumerate(report["gathered"]):
            counts = {f"reason_{i}": i for i in range(checkpoint)}
            assert states == [{"next_index": 7 ** checkpoint * (shard + 1), "skips": {"counts": counts}}
                              for shard in range(2)]
        # 40 states of 40 lengths (about 50 to 700 bytes): the all-gathers (the lengths, then the
        # JSON bytes padded to a power of two) compiled 41 programs when the bytes were not padded.
        assert len(report["lowered"]) <= 4, report["lowered"]
