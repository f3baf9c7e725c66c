"""The Grain training pipeline: records -> fixed-shape :class:`~manager_jax.batch.Batch` es.

Graph (DESIGN.md "Data flow"), built by :func:`make_train_iterator`::

    records (JSON / JSONL / mixture YAML / ArrayRecord)        random access
    -> per-epoch shuffle (seeded; a new order each epoch)      MapDataset, index only
    -> this host's share: every process_count-th record        MapDataset slice
    -> record -> ProcessedSample or SkipSample                 MapDataset.map (read threads)
    -> first-fit packing / padding -> Batch arrays             IterDataset (stateful)
    -> worker processes (mp_prefetch), each on a slice          optional
    -> DataIterator: Batch objects, skip counts, state         main process

Every host applies the same global permutation and keeps indices ``i % process_count ==
process_index``, so hosts see disjoint records that together cover each epoch. A bad record
becomes a counted skip (its reason and id travel with the next batch to the main process);
``strict=True`` raises instead. ``get_state`` / ``set_state`` capture the position exactly (a
sample read but not yet batched is re-read after a restore), so a resumed run sees the same
batches. The output depends on the seed, the host count and ``worker_count`` (each worker packs
its own slice), not on timing.

Multi-host training should use ``num_epochs=None`` (repeat forever) and count steps: with a
finite number of epochs hosts may run out of data at different steps.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

import grain
import numpy as np

from manager_jax.batch import Batch, assemble_batch
from manager_jax.data import ordering, tfds_source
from manager_jax.data.mixture import load_mixture
from manager_jax.data.packing import BatchPacker
from manager_jax.data.records import RecordFormatError, RecordSource, open_records
from manager_jax.data.samples import (
    TEMPLATES,
    TOO_LONG,
    TOO_MANY_CROPS,
    TOO_MANY_IMAGE_TOKENS,
    UNEXPECTED_ERROR,
    SampleOptions,
    SkipCounter,
    SkipSample,
    process_record,
    record_id,
)

logger = logging.getLogger(__name__)

FORMATS = ("auto", "json", "jsonl", "arrayrecord")
TOO_LONG_POLICIES = ("auto", "skip", "truncate")


@dataclasses.dataclass
class DataConfig:
    """Where the data is and how it becomes batches (the ``data`` part of a run config).

    Attributes:
      data_path: LLaVA .json / .jsonl (or the original's ``dir/{a,b}.json``), or a folder written
        by tools/prepare_data.py (ArrayRecord).
      image_folder: folder that record image paths are relative to (not used for ArrayRecord).
      mixture: a mixture YAML (mixture.py); used instead of ``data_path`` (which refuses a YAML).
      format: "auto" (by suffix / folder) | "json" | "jsonl" | "arrayrecord".
      split: split of an ArrayRecord dataset.
      template: "plain" (stage 1) | "qwen_1_5".
      tokenizer_path: a local HF tokenizer folder; None = the offline Qwen2 tokenizer.
      rows_per_host: B, rows of each shard batch (despite the name: a training step takes
        ``batch_shards x B x grad_accum`` rows, whatever the number of hosts; TrainConfig).
      seq_len: S, tokens per row (the original's tokenizer_model_max_length: 8192 in stage 1,
        16384 later).
      max_crops: C, crops per shard batch (an anyres_max_9 image takes up to 37 crops).
      max_image_tokens: T, image tokens per shard batch (an anyres_max_9 image takes up to ~8.8k).
      pack: first-fit several samples per row; False = one sample per row, right-padded.
      too_long: samples longer than S after expansion: "truncate" (cut, parity mode), "skip"
        (reason "too_long"), or "auto" = truncate when not packing, skip when packing.
      max_tiles: optional cap on the anyres tiles per image (not in the original).
      seed: shuffle seed (also seeds random:K mixture strategies).
      shuffle: shuffle the records (a new permutation each epoch).
      group_by_modality_length: order each epoch as the original's ``--group_by_modality_length``
        (stages 1.5 and 2; :mod:`manager_jax.data.ordering`): each optimizer step from one
        modality, shard batches of similar lengths. Needs ``shuffle``; the grouping follows the
        step's layout (shards x rows x accumulation steps) exactly when ``pack`` is False; then
        a skipped record leaves its row empty, so that the later records keep their places (the
        original fills it with the next record of the file, training that one twice).
      num_epochs: passes over the data; None = repeat forever.
      worker_count: Grain worker processes (0 = everything in the calling process). Workers are
        spawned, so a script that uses them needs the ``if __name__ == "__main__":`` guard.
      worker_buffer_size: batches each worker prepares ahead.
      read_threads: threads mapping records to samples inside each process.
      read_buffer_size: samples prefetched by those threads (each can weigh tens of MB).
      strict: raise at the first bad record instead of skipping it.
      max_skip_fraction: training stops with an error once more than this share of the records
        a process has read were skipped as bad (a wrong image_folder, say, would otherwise train
        on the text-only records alone); None = never stop (a warning above 10% remains).
      skip_check_after: records a process reads before ``max_skip_fraction`` is applied (too
        few records say little about the rest).
    """

    data_path: str | None = None
    image_folder: str | None = None
    mixture: str | None = None
    format: str = "auto"
    split: str = "train"
    template: str = "qwen_1_5"
    tokenizer_path: str | None = None
    rows_per_host: int = 1
    seq_len: int = 16384
    max_crops: int = 40
    max_image_tokens: int = 16384
    pack: bool = True
    too_long: str = "auto"
    max_tiles: int | None = None
    seed: int = 0
    shuffle: bool = True
    group_by_modality_length: bool = False
    num_epochs: int | None = 1
    worker_count: int = 0
    worker_buffer_size: int = 2
    read_threads: int = 2
    read_buffer_size: int = 8
    strict: bool = False
    max_skip_fraction: float | None = 0.5
    skip_check_after: int = 200

    def __post_init__(self) -> None:
        problems = []
        if self.template not in TEMPLATES:
            problems.append(f"template {self.template!r} not in {TEMPLATES}")
        if self.format not in FORMATS:
            problems.append(f"format {self.format!r} not in {FORMATS}")
        if self.too_long not in TOO_LONG_POLICIES:
            problems.append(f"too_long {self.too_long!r} not in {TOO_LONG_POLICIES}")
        for name in ("rows_per_host", "seq_len"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        for name in ("max_crops", "max_image_tokens", "worker_count", "read_threads"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0")
        if self.num_epochs is not None and self.num_epochs < 1:
            problems.append("num_epochs must be >= 1 or None (forever)")
        if self.max_skip_fraction is not None and not 0 <= self.max_skip_fraction < 1:
            problems.append("max_skip_fraction must lie in [0, 1), or be None (never stop)")
        if self.group_by_modality_length and not self.shuffle:
            problems.append("group_by_modality_length draws a random order: it needs shuffle=True")
        if self.skip_check_after < 1:
            problems.append("skip_check_after must be >= 1")
        if problems:
            raise ValueError("invalid data config:\n  - " + "\n  - ".join(problems))

    @property
    def truncate(self) -> bool:
        """Whether too-long samples are cut (True) or skipped (False)."""
        return (not self.pack) if self.too_long == "auto" else self.too_long == "truncate"


def open_source(config: DataConfig) -> RecordSource:
    """The random-access records named by the config; RecordFormatError when there are none."""
    if config.mixture:
        source = load_mixture(config.mixture, seed=config.seed)
    elif not config.data_path:
        raise ValueError("DataConfig needs data_path or mixture")
    elif config.format == "arrayrecord" or (config.format == "auto" and tfds_source.is_arrayrecord_dir(config.data_path)):
        source = tfds_source.ArrayRecordRecords(config.data_path, config.split)
    else:
        source = open_records(config.data_path, "auto" if config.format == "auto" else config.format)
    if len(source) == 0:  # found here, before a run writes anything, rather than by the first batch
        raise RecordFormatError(f"{config.mixture or config.data_path}: no records")
    return source


def sample_options(data_config: DataConfig, model_config: Any) -> SampleOptions:
    """SampleOptions from the model config (image handling) and the data config (limits)."""
    return SampleOptions.from_configs(
        model_config,
        template=data_config.template,
        image_folder=data_config.image_folder,
        max_tiles=data_config.max_tiles,
        seq_len=data_config.seq_len,
        truncate=data_config.truncate,
        max_crops=data_config.max_crops,
        max_image_tokens=data_config.max_image_tokens,
    )


# ---------------------------------------------------------------------------------------------
# Grain pieces
# ---------------------------------------------------------------------------------------------


class EpochShuffleMapDataset(grain.MapDataset):
    """``num_epochs`` passes over ``parent`` (None = endless), each in its own seeded order.

    The order is a seeded shuffle of each epoch, the records in order (``shuffle=False``), or
    ``epoch_order(epoch)``: a whole epoch's permutation of record indices, computed once per epoch
    (the original's modality-length grouping, :mod:`manager_jax.data.ordering`).
    """

    def __init__(self, parent: grain.MapDataset, *, seed: int, num_epochs: int | None, shuffle: bool,
                 epoch_order: Callable[[int], np.ndarray] | None = None) -> None:
        super().__init__(parent)
        self._epoch_len = len(parent)
        if self._epoch_len == 0:
            raise RecordFormatError("the data source has no records")
        self._seed = int(seed) % 2**32
        self._shuffle = shuffle
        self._length = sys.maxsize if num_epochs is None else self._epoch_len * num_epochs
        self._epoch_order = epoch_order
        self._order_lock = threading.Lock()
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its order)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_order_lock"], state["_order"] = None, None  # worker processes compute their own
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._order_lock = threading.Lock()

    def __len__(self) -> int:
        return self._length

    def __str__(self) -> str:
        return f"EpochShuffleMapDataset(seed={self._seed}, shuffle={self._shuffle}, grouped={self._epoch_order is not None})"

    def _epoch_indices(self, epoch: int) -> np.ndarray:
        cached = self._order  # one read of the tuple: no lock once the epoch's order exists
        if cached is not None and cached[0] == epoch:
            return cached[1]
        with self._order_lock:  # the read threads ask at once at an epoch's start: compute it once
            if self._order is None or self._order[0] != epoch:
                order = np.asarray(self._epoch_order(epoch))
                if sorted(order.shape) != [self._epoch_len] or order.min() < 0 or order.max() >= self._epoch_len:
                    raise ValueError(f"epoch order of {order.shape} for {self._epoch_len} records")
                self._order = (epoch, order)
            return self._order[1]

    def _source_index(self, index: int) -> int:
        epoch, within = divmod(int(index), self._epoch_len)
        if self._epoch_order is not None:
            return int(self._epoch_indices(epoch)[within])
        if not self._shuffle or self._epoch_len == 1:
            return within
        return int(
            grain.experimental.index_shuffle(
                within, max_index=self._epoch_len - 1, seed=(self._seed + epoch) % 2**32, rounds=4
            )
        )

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} out of range")
        return self._parent[self._source_index(index)]


class RecordToSample:
    """Map transform: (index, record) -> ProcessedSample, or SkipSample (never raises unless strict)."""

    def __init__(self, tokenizer: Any, options: SampleOptions, strict: bool) -> None:
        self.tokenizer, self.options, self.strict = tokenizer, options, strict
        self._logged_errors = 0

    def __call__(self, item: tuple[int, Any]) -> Any:
        index, record = item
        try:
            return process_record(record, self.tokenizer, self.options, fallback_id=index)
        except SkipSample as skip:
            if self.strict:
                raise
            return skip
        except Exception as err:  # noqa: BLE001 - one odd record must not stop a long run
            if self.strict:
                raise
            if self._logged_errors < 5:
                self._logged_errors += 1
                logger.error("record %s: unexpected error, skipped:\n%s", record_id(record, index), traceback.format_exc())
            return SkipSample(UNEXPECTED_ERROR, record_id(record, index), f"{type(err).__name__}: {err}")


@dataclasses.dataclass(frozen=True)
class BatchShapes:
    rows: int
    seq_len: int
    max_crops: int
    max_image_tokens: int
    pack: bool
    truncate: bool
    grid_type: str | None
    query_type: str | None
    pad_id: int
    im_start_id: int
    # A skipped record leaves its row empty instead of the next record taking it (one sample per
    # row only): every batch then takes `rows` records of the stream, as group_by_modality_length
    # placed them.
    skips_keep_rows: bool = False


class BatchIterDataset(grain.IterDataset):
    """Packs a stream of ProcessedSample / SkipSample into Batch dicts (``Batch.to_dict`` + "skipped")."""

    def __init__(self, parent: grain.IterDataset, shapes: BatchShapes, max_consecutive_skips: int) -> None:
        super().__init__(parent)
        self._shapes = shapes
        self._max_consecutive_skips = max_consecutive_skips

    def __iter__(self) -> "BatchDatasetIterator":
        return BatchDatasetIterator(self._parent.__iter__(), self._shapes, self._max_consecutive_skips)

    def __str__(self) -> str:
        return f"BatchIterDataset(rows={self._shapes.rows}, seq_len={self._shapes.seq_len}, pack={self._shapes.pack})"


class BatchDatasetIterator(grain.DatasetIterator):
    """State: the parent's state before the one sample read but not yet batched (if any)."""

    def __init__(self, parent: grain.DatasetIterator, shapes: BatchShapes, max_consecutive_skips: int) -> None:
        super().__init__(parent)
        self._shapes = shapes
        self._max_consecutive_skips = max_consecutive_skips
        self._packer = BatchPacker(
            rows=shapes.rows, seq_len=shapes.seq_len, max_crops=shapes.max_crops,
            max_image_tokens=shapes.max_image_tokens, pack=shapes.pack,
        )
        self._pending: Any = None  # a sample that did not fit the previous batch
        self._pending_state: Any = None  # parent state from before that sample was read

    def _length(self, sample: Any) -> int:
        n = sample.expanded_length
        return min(n, self._shapes.seq_len) if self._shapes.truncate else n

    def __next__(self) -> dict[str, Any]:
        packer, samples, skipped = self._packer, [], []
        packer.reset()
        consecutive_skips = 0
        keep_rows = self._shapes.skips_keep_rows and not self._shapes.pack
        rows_left = self._shapes.rows  # records this batch may still take (keep_rows)
        while not keep_rows or rows_left > 0:
            if self._pending is not None:
                item, state_before = self._pending, self._pending_state
                self._pending, self._pending_state = None, None
            else:
                state_before = self._parent.get_state()
                try:
                    item = next(self._parent)
                except StopIteration:
                    break
            rows_left -= 1
            if isinstance(item, SkipSample):
                skipped.append([item.reason, item.record_id, item.detail])
                consecutive_skips += 1
                if consecutive_skips > self._max_consecutive_skips:
                    # RecordFormatError: run.py reports bad data in one line, not as a crash.
                    raise RecordFormatError(
                        f"{consecutive_skips} records in a row were skipped (last: {item}); "
                        "the data or the config is probably wrong"
                    )
                continue
            consecutive_skips = 0
            length = self._length(item)
            if not packer.fits_alone(length, item.num_crops, item.num_image_tokens):
                # samples.py checks these limits; this guards samples built elsewhere.
                reason = TOO_LONG if length > self._shapes.seq_len else (
                    TOO_MANY_CROPS if item.num_crops > self._shapes.max_crops else TOO_MANY_IMAGE_TOKENS)
                skipped.append([reason, str(item.id)])
                continue
            if packer.try_add(length, item.num_crops, item.num_image_tokens):
                samples.append(item)
                continue
            self._pending, self._pending_state = item, state_before
            break
        if not samples:
            if not skipped:
                raise StopIteration
            if not keep_rows or rows_left > 0:  # the records skipped after the last batch: counted like the others
                return {"skipped": skipped}
            # keep_rows: every record of the batch was skipped; an empty batch keeps the place.
        s = self._shapes
        batch = assemble_batch(
            samples, rows=s.rows, seq_len=s.seq_len, max_crops=s.max_crops, max_image_tokens=s.max_image_tokens,
            pack=s.pack, truncate=s.truncate, grid_type=s.grid_type, query_type=s.query_type,
            pad_id=s.pad_id, im_start_id=s.im_start_id,
        )
        out = batch.to_dict()
        out["skipped"] = skipped
        return out

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._pending_state if self._pending is not None else self._parent.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._pending, self._pending_state = None, None


class DataChangedError(RecordFormatError):
    """A checkpoint's data state does not fit the data the run now reads."""


class DataIterator:
    """Iterator of :class:`Batch`; tallies skips and the samples it delivered (``skips``,
    ``samples``: since the start of the run, restored with the state); ``get_state`` /
    ``set_state`` for checkpoints.

    The state is a JSON-compatible dict (save it with the model checkpoint).
    """

    def __init__(self, grain_iterator: Any, *, description: str = "", num_records: int | None = None) -> None:
        self._it = grain_iterator
        self.num_records = num_records  # of the source: a restored state must index the same records
        self.skips = SkipCounter()
        self.samples = 0
        self.description = description
        self.summary_at_end = True  # log the skip counts when the data runs out
        self._finished = False

    def __iter__(self) -> "DataIterator":
        return self

    def __next__(self) -> Batch:
        try:
            element = next(self._it)
        except StopIteration:
            if not self._finished:
                self._finished = True
                if self.summary_at_end:
                    self.skips.log_summary(logger)
            raise
        for reason, rid, *detail in element.pop("skipped"):
            self.skips.add_reason(reason, rid, *detail)
        if not element:  # only the skips at the end of the data, no batch
            return next(self)
        batch = Batch.from_dict(element)
        self.samples += batch.num_samples
        return batch

    def get_state(self) -> dict[str, Any]:
        state = {"pipeline": self._it.get_state(), "skips": self.skips.get_state(), "samples": self.samples}
        if self.num_records is not None:
            state["num_records"] = self.num_records
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        saved = state.get("num_records")  # absent in states saved before it was recorded
        if saved is not None and self.num_records is not None and saved != self.num_records:
            # The state holds positions in the shuffled order of `saved` records: over other records
            # it would silently repeat some and never reach others.
            raise DataChangedError(
                f"the data changed since this checkpoint was saved: its run read {saved} records, the data "
                f"now has {self.num_records}. Resuming would continue another order. Restore the data "
                "the run was started with, or start a new run in another output_dir"
            )
        self._it.set_state(state["pipeline"])
        self.skips.set_state(state.get("skips", {}))
        # States saved before samples were counted: start counting both afresh.
        if "samples" not in state:
            self.skips.set_state({})
        self.samples = int(state.get("samples", 0))
        self._finished = False

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


def _ensure_absl_flags_parsed() -> None:
    # Grain's worker start-up reads absl flags; outside absl.app nothing parses them, so use
    # their defaults (a no-op when the program already parsed its flags).
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _with_index(index: int, record: Any) -> tuple[int, Any]:
    # The source index names records that have no "id".
    return index, record


def build_dataset(
    data_config: DataConfig,
    model_config: Any,
    tokenizer: Any,
    *,
    process_index: int,
    process_count: int,
    source: RecordSource | None = None,
    accum: int = 1,
) -> grain.IterDataset:
    """The Grain dataset of Batch dicts for one host (see the module docstring).

    ``accum``: the accumulation steps of an optimizer step, which (with ``process_count`` shards
    of ``rows_per_host`` rows) sets the step window of ``group_by_modality_length``.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} must lie in [0, {process_count})")
    source = open_source(data_config) if source is None else source
    options = sample_options(data_config, model_config)
    records = grain.MapDataset.source(source).map_with_index(_with_index)
    epoch_order = None
    if data_config.group_by_modality_length:
        epoch_order = functools.partial(
            ordering.grouped_epoch_order, ordering.modality_lengths(source), seed=data_config.seed,
            shards=process_count, rows=data_config.rows_per_host, accum=accum, workers=data_config.worker_count,
        )
    ds = EpochShuffleMapDataset(records, seed=data_config.seed, num_epochs=data_config.num_epochs,
                                shuffle=data_config.shuffle, epoch_order=epoch_order)
    ds = ds[process_index::process_count]
    samples = ds.map(RecordToSample(tokenizer, options, data_config.strict))
    it = samples.to_iter_dataset(
        grain.ReadOptions(num_threads=data_config.read_threads, prefetch_buffer_size=data_config.read_buffer_size)
    )
    manager = model_config.manager
    shapes = BatchShapes(
        rows=data_config.rows_per_host,
        seq_len=data_config.seq_len,
        max_crops=data_config.max_crops,
        max_image_tokens=data_config.max_image_tokens,
        pack=data_config.pack,
        truncate=data_config.truncate,
        grid_type=manager.grid_type if manager.enabled else None,
        query_type=manager.query_type,
        pad_id=int(getattr(tokenizer, "pad_id", 0)),
        im_start_id=int(getattr(tokenizer, "im_start_id", 151644)),
        skips_keep_rows=data_config.group_by_modality_length,
    )
    batches = BatchIterDataset(it, shapes, max_consecutive_skips=max(1000, len(source)))
    if data_config.worker_count > 0:
        _ensure_absl_flags_parsed()
        batches = batches.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=data_config.worker_count, per_worker_buffer_size=data_config.worker_buffer_size
            )
        )
    return batches


def make_train_iterator(
    data_config: DataConfig,
    model_config: Any,
    tokenizer: Any,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    source: RecordSource | None = None,
    accum: int = 1,
) -> DataIterator:
    """This host's iterator of fixed-shape :class:`Batch` es.

    ``process_index`` / ``process_count`` default to ``jax.process_index()`` /
    ``jax.process_count()``; pass them explicitly to simulate several hosts. ``source``
    overrides the records named by ``data_config`` (tests, custom sources); ``accum`` is the
    accumulation steps per optimizer step (see :func:`build_dataset`).
    """
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    source = open_source(data_config) if source is None else source
    ds = build_dataset(
        data_config, model_config, tokenizer, process_index=process_index, process_count=process_count, source=source,
        accum=accum,
    )
    return DataIterator(iter(ds), description=f"host {process_index}/{process_count}", num_records=len(source))

