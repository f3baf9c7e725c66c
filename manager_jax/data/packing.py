"""First-fit packing of samples into the fixed rows of a batch (DESIGN.md "Sequences").

Pure bookkeeping on lengths and counts, no arrays: :func:`first_fit_rows` assigns a list of
samples to rows, :class:`BatchPacker` makes the same decisions one sample at a time (the data
pipeline uses it to know when a batch is full). Both give the same rows for the same sample
order, so the pipeline can hand the accepted samples to :func:`manager_jax.batch.assemble_batch`
which re-runs :func:`first_fit_rows`.

No sample is ever cut across rows: a sample either fits whole into one row or starts a new batch.
"""

from __future__ import annotations

from collections.abc import Sequence


class BatchShapeError(ValueError):
    """Samples that do not fit the fixed shapes (rows, seq_len, max_crops, max_image_tokens)."""


def first_fit_rows(lengths: Sequence[int], *, rows: int, seq_len: int, pack: bool) -> list[int]:
    """Row index of each sample.

    pack=True: first fit, each sample goes to the lowest-numbered row with room for all of its
    tokens (samples keep their order inside a row). pack=False: sample i goes to row i.
    Raises :class:`BatchShapeError` when a sample does not fit.
    """
    if rows < 1 or seq_len < 1:
        raise BatchShapeError(f"rows and seq_len must be >= 1, got rows={rows}, seq_len={seq_len}")
    if not pack:
        if len(lengths) > rows:
            raise BatchShapeError(f"{len(lengths)} samples for {rows} rows (non-packed mode: one sample per row)")
        for i, length in enumerate(lengths):
            if length > seq_len:
                raise BatchShapeError(f"sample {i} has {length} tokens > seq_len {seq_len}")
        return list(range(len(lengths)))
    used = [0] * rows
    assignment = []
    for i, length in enumerate(lengths):
        if length > seq_len:
            raise BatchShapeError(
                f"sample {i} has {length} tokens after image expansion > seq_len {seq_len}; "
                "packed mode never cuts a sample (skip it or use truncation)"
            )
        row = next((r for r in range(rows) if used[r] + length <= seq_len), None)
        if row is None:
            raise BatchShapeError(
                f"sample {i} ({length} tokens) fits no row: rows hold {used} of {seq_len} tokens"
            )
        used[row] += length
        assignment.append(row)
    return assignment


class BatchPacker:
    """Streaming version of :func:`first_fit_rows` plus the batch-wide crop and token budgets.

    ``try_add`` accepts a sample when it fits a row (first fit, or the next free row when not
    packing), the batch's crops stay <= ``max_crops`` and its image tokens <= ``max_image_tokens``.
    When it returns False the current batch is complete; call ``reset`` and add the sample again.
    """

    def __init__(self, *, rows: int, seq_len: int, max_crops: int, max_image_tokens: int, pack: bool) -> None:
        if min(rows, seq_len) < 1 or min(max_crops, max_image_tokens) < 0:
            raise BatchShapeError(
                f"invalid batch shape rows={rows} seq_len={seq_len} max_crops={max_crops} "
                f"max_image_tokens={max_image_tokens}"
            )
        self.rows, self.seq_len, self.pack = rows, seq_len, pack
        self.max_crops, self.max_image_tokens = max_crops, max_image_tokens
        self.reset()

    def reset(self) -> None:
        self.row_lengths = [0] * self.rows
        self.rows_used = 0
        self.crops = 0
        self.image_tokens = 0
        self.num_samples = 0

    @property
    def empty(self) -> bool:
        return self.num_samples == 0

    def fits_alone(self, length: int, crops: int, image_tokens: int) -> bool:
        """Whether the sample fits an empty batch (else it can never be batched)."""
        return length <= self.seq_len and crops <= self.max_crops and image_tokens <= self.max_image_tokens

    def try_add(self, length: int, crops: int, image_tokens: int) -> bool:
        if self.crops + crops > self.max_crops or self.image_tokens + image_tokens > self.max_image_tokens:
            return False
        if length > self.seq_len:
            return False
        if self.pack:
            row = next((r for r in range(self.rows) if self.row_lengths[r] + length <= self.seq_len), None)
        else:
            row = self.rows_used if self.rows_used < self.rows else None
        if row is None:
            return False
        self.row_lengths[row] += length
        self.rows_used = max(self.rows_used, row + 1)
        self.crops += crops
        self.image_tokens += image_tokens
        self.num_samples += 1
        return True
