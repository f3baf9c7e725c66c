"""The held-out loss of a training run (`TrainConfig.eval`): every `eval.every_steps` steps and
at the run's end, the mean cross-entropy over every supervised token of a data set.

The set is read from its start at each evaluation, in file order, into step batches of the
training's shapes and layout; so the compiled program is the training's forward pass over the same
batch shapes, and the loss is one mean over the set's tokens whatever the mesh, the number of
processes or the packing. Shards that run out first give empty batches while the others finish.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp

from manager_jax.distributed import any_process
from manager_jax.train.feed import DataFeed
from manager_jax.train.recipe import TrainConfig
from manager_jax.train.state import TrainSetup, jit_eval_step, place_batch
from manager_jax.train.step import LossConfig

logger = logging.getLogger(__name__)

# The generated held-out set draws with data.seed + this (the training set: data.seed). The demo's
# scenes come from a small space of colours, shapes and places: some of its records repeat the
# training set's, as a real held-out set of that task would.
SYNTHETIC_SEED_OFFSET = 1000


def eval_data_config(config: TrainConfig, data_path: str | None = None, image_folder: str | None = None) -> Any:
    """The training's data config, reading the held-out set (or `data_path` / `image_folder`,
    where it was generated) once, in order."""
    held_out = config.eval
    return dataclasses.replace(
        config.data,
        data_path=data_path or held_out.data_path,
        mixture=None if data_path else held_out.mixture,
        image_folder=image_folder or held_out.image_folder or config.data.image_folder,
        format="auto" if data_path else held_out.format,
        split=held_out.split or config.data.split,
        shuffle=False,
        group_by_modality_length=False,
        num_epochs=1,
        max_skip_fraction=None,
    )


def open_eval_source(config: TrainConfig) -> Any:
    """The held-out records named by `config.eval` (None when it names none, or generates them):
    opened before the run writes anything, as the training data is."""
    from manager_jax.data.pipeline import open_source

    if not (config.eval.data_path or config.eval.mixture):
        return None
    return open_source(eval_data_config(config))


def synthetic_eval_data(config: TrainConfig, directory: str) -> tuple[Any, Any]:
    """Generates `config.eval.synthetic_records` held-out records into `directory`; returns (their
    data config, their source)."""
    from manager_jax.data.pipeline import open_source
    from manager_jax.data.synthetic import DEFAULT_SIZES, make_synthetic_dataset

    sizes = [tuple(s) for s in config.synthetic_image_sizes] if config.synthetic_image_sizes else DEFAULT_SIZES
    ds = make_synthetic_dataset(directory, num_records=config.eval.synthetic_records,
                                seed=config.data.seed + SYNTHETIC_SEED_OFFSET, sizes=sizes)
    data_config = eval_data_config(config, data_path=ds.records_path, image_folder=ds.image_folder)
    return data_config, open_source(data_config)


class Evaluator:
    """Runs the held-out evaluation with the train state's params (every process calls `run`)."""

    def __init__(self, config: TrainConfig, setup: TrainSetup, *, data_config: Any, source: Any, shards: int,
                 accum: int, tokenizer: Any, batch_abstract: dict) -> None:
        self.data_config, self.source = data_config, source
        self.setup, self.shards, self.accum, self.tokenizer = setup, shards, accum, tokenizer
        self.max_batches = config.eval.max_batches
        self.batch_abstract = batch_abstract
        # The training's loss settings: its token budget bounds the LM head's positions per shard
        # batch; a batch over it is evaluated by a second program without the budget (compiled
        # on first use), so no token is ever left out.
        self.loss = LossConfig("token_mean", config.loss_token_budget, config.loss_chunk_size)
        self._programs: dict[bool, Any] = {}

    def _program(self, over_budget: bool) -> Any:
        key = over_budget and self.loss.token_budget > 0
        if key not in self._programs:
            loss = dataclasses.replace(self.loss, token_budget=0) if key else self.loss
            self._programs[key] = jit_eval_step(self.setup, self.batch_abstract, loss)
        return self._programs[key]

    def run(self, params: dict) -> dict[str, Any]:
        """{"loss", "tokens", "samples", "batches", "seconds", "skipped"}: the mean token
        cross-entropy over the held-out set (or its first `eval.max_batches` step batches), the
        supervised tokens and samples it covers, and the records this process skipped, by reason."""
        start = time.perf_counter()
        feed = DataFeed(self.data_config, self.setup, shards=self.shards, accum=self.accum, tokenizer=self.tokenizer,
                        source=self.source, token_budget=self.loss.token_budget, pad_exhausted=True)
        totals, batches = None, 0
        try:
            while not self.max_batches or batches < self.max_batches:
                fetched = feed.next()
                # Every process runs each step's program, until all of them have run out.
                has_data, over_budget = any_process((fetched is not None, fetched is not None and fetched[1]))
                if not has_data:
                    break
                arrays = fetched[0] if fetched is not None else feed.empty_step()
                sums = self._program(over_budget)(params, place_batch(self.setup, arrays, shards=self.shards))
                totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
                batches += 1
            skipped, _ = feed.skip_stats()
        finally:
            feed.close()
        totals = jax.device_get(totals) if totals is not None else {"nll": 0.0, "tokens": 0, "samples": 0}
        tokens = int(totals["tokens"])
        return {
            "loss": float(totals["nll"]) / tokens if tokens else float("nan"),
            "tokens": tokens,
            "samples": int(totals["samples"]),
            "batches": batches,
            "seconds": round(time.perf_counter() - start, 3),
            "skipped": skipped,
        }


def format_evaluation(results: dict[str, Any]) -> str:
    skipped = sum(results["skipped"].values())
    return (f"eval loss {results['loss']:.4f} over {results['tokens']:,} tokens ({results['samples']} samples, "
            f"{results['batches']} step batches, {results['seconds']:.1f} s"
            + (f"; {skipped} records skipped: {results['skipped']}" if skipped else "") + ")")

