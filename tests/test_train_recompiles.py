"""A long run compiles its programs once: no step after the first lowers a program again, neither a
checkpoint step, a log step, the last step nor the steps of a resumed run.

A recompilation per step (a changed dtype, weak type or sharding of the state the step returns)
costs a compile every step, and its cache entries grow without bound. Counted with JAX's own
monitoring events: every lowering of a jitted function records one, the persistent compilation
cache's hits included.
"""

from __future__ import annotations

import jax
import pytest
from jax._src import dispatch

from manager_jax.train import loop as loop_lib
from tests.test_train_loop import demo_config
from tests.train_batches import compile_cache_fixture


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    yield from compile_cache_fixture(tmp_path_factory)


class Lowerings:
    """The functions lowered while the run is at each step: {step the loop last reported: [names]}."""

    def __init__(self) -> None:
        self.step = -1  # before the first report
        self.by_step: dict[int, list[str]] = {}

    def on_event(self, event: str, duration: float, **kwargs) -> None:
        if event == dispatch.JAXPR_TO_MLIR_MODULE_EVENT:
            self.by_step.setdefault(self.step, []).append(str(kwargs.get("fun_name")))

    def on_step(self, step: int, record: dict) -> None:
        self.step = step

    def train(self, config) -> loop_lib.TrainResult:
        jax.monitoring.register_event_duration_secs_listener(self.on_event)
        try:
            return loop_lib.train(config, on_step=self.on_step)
        finally:
            jax.monitoring.unregister_event_duration_listener(self.on_event)


@pytest.mark.slow
def test_no_step_after_the_first_compiles_again_across_checkpoints_logs_and_a_resume(tmp_path):
    # Checkpoints every 2 steps (keep 2: older ones are deleted), metrics every 3 steps and
    # TensorBoard on; stopped at step 5, then resumed to step 8 in the same directory.
    overrides = ["checkpoint.every_steps=2", "checkpoint.keep=2", "logging.every_steps=3", "logging.tensorboard=True",
                 "loss_token_budget=0"]  # one program: a batch over the budget would compile the other once
    first = Lowerings()
    a = first.train(demo_config(tmp_path, "num_steps=8", "stop_at_step=5", *overrides))
    assert (a.status, a.last_step) == ("stopped", 5)
    second = Lowerings()
    b = second.train(demo_config(tmp_path, "num_steps=8", *overrides))
    assert (b.first_step, b.last_step, b.status) == (5, 8, "completed")
    for run, first_step in ((first, 0), (second, 5)):
        # on_step(n) is called once step n + 1 is dispatched: what was lowered before the first
        # report covers the run's first two steps, which lower the train step once.
        before = run.by_step.pop(-1, [])
        assert sum("train_step" in name for name in before) == 1, before
        assert not run.by_step, f"lowered again after step {first_step + 2} was dispatched: {run.by_step}"
