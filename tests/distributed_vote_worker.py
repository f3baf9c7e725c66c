"""One of two processes of tests/test_distributed_vote.py (started with JAX_* set)."""

import json
import sys

import jax
import jax.numpy as jnp

from manager_jax import distributed

distributed.initialize()
me = jax.process_index()
results = []
# Round r: process p raises flag i when (r + p + i) % 3 == 0, and flag 2 only in process 1.
for r in range(6):
    results.append(distributed.any_process(((r + me) % 3 == 0, (r + me + 1) % 3 == 0, me == 1)))


@jax.jit
def busy(x):
    return jax.lax.fori_loop(0, 3000, lambda i, x: jnp.tanh(x @ x), x)


x = jax.device_put(jnp.full((384, 384), 1.0 / 384), jax.local_devices()[0])
busy(x).block_until_ready()  # compiled
distributed.any_process((False,))  # both processes arrive together
queued = busy(x)  # seconds of work queued on this process's device
distributed.any_process((me == 0,))
waited_for_device = queued.is_ready()
queued.block_until_ready()
for _ in range(100):
    distributed.any_process((False,))
from jax._src import distributed as jax_distributed  # noqa: E402

distributed.any_process((False,))
left = jax_distributed.global_state.client.key_value_dir_get(distributed._VOTE_PREFIX + "/")
print(json.dumps({"results": results, "waited_for_device": waited_for_device, "keys_left": [k for k, _ in left]}))
sys.stdout.flush()
