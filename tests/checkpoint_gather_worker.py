"""One of two processes of tests/test_checkpoint_gather.py (started with JAX_* set): gathers the
data states of 2 shards (one per process) at 40 checkpoints whose states grow as a run's do."""

import json
import sys

import jax
from jax._src import dispatch

from manager_jax import distributed
from manager_jax.train.checkpointing import gather_shard_states

distributed.initialize()
me = jax.process_index()
lowered = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: lowered.append(kw.get("fun_name")) if event == dispatch.JAXPR_TO_MLIR_MODULE_EVENT else None)
gathered = []
for checkpoint in range(40):
    # A position and counters that gain digits, skip details that appear: another length each time.
    state = {"next_index": 7 ** checkpoint * (me + 1), "skips": {"counts": {f"reason_{i}": i for i in range(checkpoint)}}}
    gathered.append(gather_shard_states({me: state}, 2))
print(json.dumps({"gathered": gathered, "lowered": lowered}))
sys.stdout.flush()
