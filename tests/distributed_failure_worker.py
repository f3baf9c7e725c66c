"""One of two processes of tests/test_distributed_vote.py's failure test (started with JAX_* set):
process FAILING (argv[1]) fails with status 2; the other waits in a vote it will never complete."""

import sys

import jax

from manager_jax import distributed

distributed.initialize()
if jax.process_index() == int(sys.argv[1]):
    print("error: this process's own error", file=sys.stderr)
    distributed.exit_on_failure(2)
    print("exit_on_failure returned", file=sys.stderr)  # never: it exits
else:
    distributed.any_process((False,))  # its peer never comes: waits an hour without the watcher
print("not stopped", file=sys.stderr)
