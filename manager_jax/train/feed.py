"""A process's shard batches, stacked into the arrays of one step (the training loop and the
held-out evaluation read their data through it)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from manager_jax.batch import assemble_batch
from manager_jax.sharding import local_shard_indices
from manager_jax.train.step import MODEL_FIELDS


class TrainingError(RuntimeError):
    """A run that cannot continue (non-finite losses, data problems, bad checkpoints)."""


def supervised_count(labels: np.ndarray, segment_ids: np.ndarray) -> int:
    """Positions with a next-token target (numpy twin of llava_ov.shifted_targets)."""
    same = segment_ids[:, 1:] == segment_ids[:, :-1]
    return int(((labels[:, 1:] != -100) & same & (segment_ids[:, :-1] != 0)).sum())


class DataFeed:
    """This process's shard iterators; stacks their batches into [accum, local_shards, ...] arrays.

    `pad_exhausted` (evaluation): a shard that has run out gives empty batches (padding only, no
    supervised token) while another still has data, so that every record is read; `next` returns
    None once all of this process's shards have run out. Without it (training) `next` returns None
    as soon as one shard has.
    """

    def __init__(self, data_config: Any, setup: Any, *, shards: int, accum: int, tokenizer: Any, source: Any,
                 token_budget: int = 0, pad_exhausted: bool = False) -> None:
        from manager_jax.data.pipeline import make_train_iterator

        self.data_config = data_config
        self.shards, self.accum = shards, accum
        self.shard_ids = local_shard_indices(setup.mesh, shards)
        # `source` (open_source(data_config)) is opened once, shared by this process's shard iterators.
        self.iterators = {
            k: make_train_iterator(
                data_config, setup.model_config, tokenizer, process_index=k, process_count=shards, source=source,
                accum=accum,
            )
            for k in self.shard_ids
        }
        if pad_exhausted:  # the evaluation reports its skips itself, once for all shards
            for it in self.iterators.values():
                it.summary_at_end = False
        self.pixel_dtype = np.dtype(jnp.dtype(setup.model_config.dtype))  # the tower casts to its dtype anyway
        self.token_budget = token_budget
        self.pad_exhausted = pad_exhausted
        self.exhausted: set[int] = set()  # shards that have run out (pad_exhausted)
        self._empty = None

    def next(self) -> tuple[dict[str, np.ndarray], bool] | None:
        """(this step's local arrays, whether a shard batch exceeds the loss token budget), or None
        when a shard (with `pad_exhausted`: every shard) has run out of data."""
        if self.pad_exhausted and len(self.exhausted) == len(self.shard_ids):
            return None
        per_micro = []
        over_budget = read_any = False
        pixels = None  # [accum, local shards, crops, H, W, 3]: each shard batch's crops normalised in place
        for micro in range(self.accum):
            shard_batches = []
            for slot, k in enumerate(self.shard_ids):
                batch = None
                if k not in self.exhausted:
                    try:
                        batch = next(self.iterators[k])
                    except StopIteration:
                        if not self.pad_exhausted:
                            return None
                        self.exhausted.add(k)
                if batch is None:
                    batch = self.empty_batch()
                else:
                    read_any = True
                if pixels is None:
                    pixels = np.empty((self.accum, len(self.shard_ids), *batch.pixel_values.shape), self.pixel_dtype)
                arrays = batch.to_model_inputs(pixel_dtype=self.pixel_dtype, pixels_out=pixels[micro, slot])
                if self.token_budget:
                    over_budget |= supervised_count(arrays["labels"], arrays["segment_ids"]) > self.token_budget
                shard_batches.append(arrays)
            per_micro.append(shard_batches)
        if not read_any:
            return None  # (pad_exhausted) every shard ran out before giving this step a batch
        out = {name: pixels if name == "pixel_values" else np.stack([np.stack([b[name] for b in micro]) for micro in per_micro])
               for name in MODEL_FIELDS}
        return out, over_budget

    def empty_batch(self) -> Any:
        """A shard batch of padding only (no sample, no crop, no image token)."""
        if self._empty is None:
            c = self.data_config
            self._empty = assemble_batch([], rows=c.rows_per_host, seq_len=c.seq_len, max_crops=c.max_crops,
                                         max_image_tokens=c.max_image_tokens, pack=c.pack, grid_type=None,
                                         query_type=None)
        return self._empty

    def empty_step(self) -> dict[str, np.ndarray]:
        """This process's arrays of a step of empty batches (a process whose shards have all run
        out while another's have not: every process runs each step's program)."""
        arrays = self.empty_batch().to_model_inputs(pixel_dtype=self.pixel_dtype)
        return {name: np.broadcast_to(arrays[name], (self.accum, len(self.shard_ids), *arrays[name].shape))
                for name in MODEL_FIELDS}

    def get_states(self) -> dict[int, Any]:
        return {k: it.get_state() for k, it in self.iterators.items()}

    def skip_stats(self) -> tuple[dict[str, int], int]:
        """(records skipped by reason, samples delivered) by this process's shards since the feed began."""
        counts: dict[str, int] = {}
        for it in self.iterators.values():
            for reason, n in it.skips.counts.items():
                counts[reason] = counts.get(reason, 0) + n
        return dict(sorted(counts.items())), sum(it.samples for it in self.iterators.values())

    def skip_details(self) -> dict[str, str]:
        """The first skipped record of each reason (its id and what was wrong), over this process's shards."""
        details: dict[str, str] = {}
        for it in self.iterators.values():
            for reason, detail in it.skips.details.items():
                details.setdefault(reason, detail)
        return details

    def set_states(self, states: list[Any]) -> None:
        if len(states) != self.shards:
            raise TrainingError(
                f"the checkpoint has data states for {len(states)} shards but this run uses batch_shards={self.shards}; "
                "resume with the same batch_shards"
            )
        for k, it in self.iterators.items():
            it.set_state(states[k])

    def close(self) -> None:
        for it in self.iterators.values():
            close = getattr(it, "close", None)
            if close is not None:
                close()
