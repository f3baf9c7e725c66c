"""The original's ``group_by_modality_length`` record order (SPEC §5 "Lengths and sampler").

Stages 1.5 and 2 of the original train with ``--group_by_modality_length True``: every optimizer
step draws its 512 samples from one modality (image-text or text-only), and the samples of each
device batch have similar lengths. LLaVA-NeXT's ``LengthGroupedSampler`` does it in three steps:

1. ``modality_length``: the whitespace word count of all turns, positive for records with an
   ``image`` or ``video`` key, negative for text-only ones.
2. Per modality, a random permutation cut into megabatches of one optimizer step
   (``chunks x chunk_size`` records); each megabatch sorted by length (longest first, stable) and
   dealt into ``chunks`` chunks of ``chunk_size``, each record to the chunk with the smallest total
   length so far (the first such), a full chunk taking no more. A megabatch that does not divide
   evenly is dealt round-robin instead.
3. The full megabatches of both modalities in a random order; the two last ones (partial or not)
   merged, sorted by record index, at the end.

In the original a chunk is one device's batch of one accumulation step: the dataloader deals
batches to the GPUs in turn, so chunk ``c`` of a step goes to process ``c % world`` as its
accumulation step ``c // world``. :func:`pipeline_order` places chunk ``c`` the same way on our
layout, shard ``c % shards``, accumulation step ``c // shards``, its records in consecutive rows
of that shard batch (:func:`pipeline_order` also undoes how worker processes split a shard). With
one sample per row (``pack=False``, as the recipes) a step then trains the samples of one
megabatch, grouped into shard batches as the original groups them into device batches.

The random draws are numpy's, seeded by ``(seed, epoch)``; the original draws from torch's global
generator, so the same records are not expected in the same steps, only the same structure.

Over several epochs the placement holds exactly when an epoch's record count is a multiple of a
step's; otherwise the next epoch starts inside a step and its chunks straddle shard batches. The
original loses the structure there too: HF Trainer counts accumulation micro-batches across epochs,
so its later epochs' steps straddle megabatches. The recipes train one epoch.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def modality_length(record: Any) -> int:
    """Word count of the record's turns; negative for a text-only record (never 0).

    A record the sample step will skip as bad (no conversations, an unreadable JSON line) gets
    length 1 of its modality: the original would fail on it here, we place it and count it later.
    """
    if not isinstance(record, Mapping):
        return 1
    words = 0
    turns = record.get("conversations")
    if isinstance(turns, Sequence) and not isinstance(turns, str):
        for turn in turns:
            value = turn.get("value") if isinstance(turn, Mapping) else None
            if isinstance(value, str):
                words += len(value.split())
    words = max(words, 1)
    return words if ("image" in record or "video" in record) else -words


_LENGTHS_CACHE: "weakref.WeakKeyDictionary[Any, np.ndarray]" = weakref.WeakKeyDictionary()


def modality_lengths(source: Any) -> np.ndarray:
    """``modality_length`` of every record of ``source`` (int32), read once per source object.

    A source may provide them itself (``source.modality_lengths()``: a converted data set stores
    them); otherwise (or when that returns None) every record is read, as the original does when it
    builds its sampler.
    """
    try:
        return _LENGTHS_CACHE[source]
    except (KeyError, TypeError):
        pass
    start = time.perf_counter()
    own = getattr(source, "modality_lengths", None)
    lengths = own() if callable(own) else None
    if lengths is not None:
        lengths = np.asarray(lengths, np.int32)
    else:
        lengths = np.fromiter((modality_length(source[i]) for i in range(len(source))), np.int32, len(source))
    if lengths.shape != (len(source),):
        raise ValueError(f"{source!r}: {lengths.shape[0]} modality lengths for {len(source)} records")
    seconds = time.perf_counter() - start
    if seconds > 1:
        logger.info("modality lengths of %d records read in %.1f s", len(source), seconds)
    try:
        _LENGTHS_CACHE[source] = lengths
    except TypeError:  # not weak-referenceable: computed again next time
        pass
    return lengths


def even_chunks(indices: np.ndarray, lengths: np.ndarray, num_chunks: int) -> list[np.ndarray]:
    """Deal ``indices`` (already in order) into ``num_chunks`` chunks of equal size, each to the
    chunk with the smallest total length (lowest chunk number on ties); round-robin when the
    count does not divide."""
    if len(indices) % num_chunks:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    # (total length, chunk number): the heap's minimum is the list scan's first minimum.
    heap = [(0, c) for c in range(num_chunks)]
    for index in indices.tolist():
        total, c = heapq.heappop(heap)
        chunks[c].append(index)
        if len(chunks[c]) < per_chunk:  # a full chunk leaves the heap (the original sets it to inf)
            heapq.heappush(heap, (total + int(lengths[index]), c))
    return [np.asarray(chunk, np.int64) for chunk in chunks]


def length_grouped(lengths: np.ndarray, chunk_size: int, num_chunks: int, rng: np.random.Generator) -> np.ndarray:
    """Positions into ``lengths`` (all of one sign): permuted, cut into megabatches of
    ``chunk_size * num_chunks``, each sorted largest first and dealt into even chunks. (The
    original passes a text-only set's negative lengths as they are: shortest first, and chunks
    balanced on negative totals.)"""
    perm = rng.permutation(len(lengths))
    mega = chunk_size * num_chunks
    out = []
    for start in range(0, len(perm), mega):
        megabatch = perm[start:start + mega]
        megabatch = megabatch[np.argsort(-lengths[megabatch], kind="stable")]
        out.extend(even_chunks(megabatch, lengths, num_chunks))
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def modality_grouped(lengths: np.ndarray, chunk_size: int, num_chunks: int, rng: np.random.Generator) -> np.ndarray:
    """The original's sampler order of all records (step 2 and 3 of the module docstring)."""
    lengths = np.asarray(lengths, np.int64)
    if np.any(lengths == 0):
        raise ValueError("modality lengths must not be 0")
    if np.all(lengths > 0) or np.all(lengths < 0):  # one modality: the lengths as they are, signs too
        return length_grouped(lengths, chunk_size, num_chunks, rng)
    mega = chunk_size * num_chunks
    per_modality = []
    for indices in (np.flatnonzero(lengths > 0), np.flatnonzero(lengths < 0)):
        order = indices[length_grouped(np.abs(lengths[indices]), chunk_size, num_chunks, rng)]
        per_modality.append([order[i:i + mega] for i in range(0, len(order), mega)])
    (*image_full, image_last), (*text_full, text_last) = per_modality
    full = image_full + text_full
    megabatches = [full[i] for i in rng.permutation(len(full))]
    megabatches.append(np.sort(np.concatenate([image_last, text_last])))
    return np.concatenate(megabatches)


def pipeline_order(order: np.ndarray, *, shards: int, rows: int, accum: int, workers: int = 0) -> np.ndarray:
    """Rearrange ``order`` (each step's chunks of ``rows`` records, chunk-major) so that the
    pipeline puts chunk ``c`` of a step in shard ``c % shards`` at accumulation step ``c // shards``.

    The pipeline deals record ``p`` to shard ``p % shards``; a shard's ``j``-th batch takes its
    next ``rows`` records, or, with ``workers`` worker processes, worker ``j % workers`` batches
    every ``workers``-th record of the shard (Grain gives each worker a slice) and the batches
    come from the workers in turn. The placement repeats every ``lcm(accum, workers)`` batches of
    a shard; a last partial window keeps its order.
    """
    w = max(int(workers), 1)
    batches = math.lcm(accum, w)  # shard batches per window
    window = shards * rows * batches
    chunk, row = np.divmod(np.arange(window), rows)
    step, within = np.divmod(chunk, shards * accum)
    a, k = np.divmod(within, shards)
    j = step * accum + a  # the shard's batch, counted in the window
    n = j % w + w * ((j // w) * rows + row)  # its row's place in the shard's stream
    target = k + shards * n
    out = np.array(order, copy=True)
    full = len(order) // window * window
    out[:full].reshape(-1, window)[:, target] = np.asarray(order[:full]).reshape(-1, window)
    return out


def grouped_epoch_order(lengths: np.ndarray, epoch: int, *, seed: int, shards: int, rows: int,
                        accum: int, workers: int = 0) -> np.ndarray:
    """One epoch's order of record indices for the pipeline: grouped as the original, placed on
    the shard layout; a new draw each epoch."""
    rng = np.random.default_rng([int(seed) % 2**32, int(epoch)])
    order = modality_grouped(lengths, rows, shards * accum, rng)
    return pipeline_order(order, shards=shards, rows=rows, accum=accum, workers=workers)
