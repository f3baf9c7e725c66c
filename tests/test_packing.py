"""First-fit packing: order, no sample cut, budgets; the streaming packer agrees with the batch one."""

import numpy as np
import pytest

from manager_jax import multigrid
from manager_jax.batch import ProcessedSample, assemble_batch
from manager_jax.data.packing import BatchPacker, BatchShapeError, first_fit_rows


def test_first_fit_puts_each_sample_in_the_lowest_row_with_room():
    # rows of 10: 6 -> r0; 5 -> r1; 4 -> r0 (10); 3 -> r1 (8); 2 -> r1 (10); 1 -> r2
    assert first_fit_rows([6, 5, 4, 3, 2, 1], rows=3, seq_len=10, pack=True) == [0, 1, 0, 1, 1, 2]


def test_first_fit_never_exceeds_a_row_and_raises_when_full():
    lengths = [7, 3, 8, 2, 5, 5]
    rows = first_fit_rows(lengths, rows=3, seq_len=10, pack=True)
    for r in range(3):
        assert sum(n for n, row in zip(lengths, rows) if row == r) <= 10
    with pytest.raises(BatchShapeError, match="fits no row"):
        first_fit_rows([6, 6, 6], rows=2, seq_len=10, pack=True)
    with pytest.raises(BatchShapeError, match="never cuts"):
        first_fit_rows([11], rows=2, seq_len=10, pack=True)


def test_unpacked_mode_is_one_sample_per_row():
    assert first_fit_rows([3, 3], rows=4, seq_len=10, pack=False) == [0, 1]
    with pytest.raises(BatchShapeError, match="one sample per row"):
        first_fit_rows([1, 1, 1], rows=2, seq_len=10, pack=False)


def test_streaming_packer_enforces_row_crop_and_token_budgets():
    p = BatchPacker(rows=2, seq_len=10, max_crops=3, max_image_tokens=20, pack=True)
    assert p.try_add(6, 1, 5) and p.try_add(6, 1, 5) and p.try_add(4, 0, 0)
    assert p.row_lengths == [10, 6]
    assert not p.try_add(5, 0, 0)  # no row has 5 free tokens
    assert p.try_add(4, 1, 10)  # row 1 -> 10 tokens, 3 crops, 20 image tokens
    assert not p.try_add(0, 1, 0)  # crops budget
    p.reset()
    assert p.empty and p.try_add(1, 0, 20) and not p.try_add(1, 0, 1)  # image-token budget
    assert not BatchPacker(rows=1, seq_len=4, max_crops=1, max_image_tokens=1, pack=False).fits_alone(5, 0, 0)


def _sample(sid: str, n_text: int, image_tokens: int | None) -> ProcessedSample:
    plans, ids = [], list(range(1, n_text + 1))
    if image_tokens:
        t = image_tokens
        plans = [multigrid.ImagePlan(1, None, np.zeros((t, 4), np.int32), np.tile([[1, 0, 0, 0]], (t, 1)).astype(np.float32),
                                     np.zeros(t, bool), np.ones(t, bool))]
        ids = [-200] + ids
    return ProcessedSample(sid, np.array(ids), np.array(ids), np.zeros((len(plans), 2, 2, 3), np.uint8), plans)


def test_streaming_decisions_reproduce_assemble_batch_rows():
    rng = np.random.default_rng(0)
    samples = [_sample(f"s{i}", int(rng.integers(1, 12)), int(rng.integers(0, 2)) * 5) for i in range(40)]
    packer = BatchPacker(rows=3, seq_len=16, max_crops=4, max_image_tokens=30, pack=True)
    batches, current = [], []
    for s in samples:
        if not packer.try_add(s.expanded_length, s.num_crops, s.num_image_tokens):
            batches.append(current)
            packer.reset()
            current = []
            assert packer.try_add(s.expanded_length, s.num_crops, s.num_image_tokens)
        current.append(s)
    batches.append(current)
    seen = []
    for group in batches:
        batch = assemble_batch(group, rows=3, seq_len=16, max_crops=4, max_image_tokens=30, pack=True,
                               grid_type=None, query_type=None, crop_size=2)
        seen += [sid for row in batch.sample_ids for sid in row]
        for r, row in enumerate(batch.sample_ids):
            # Every sample of the row is whole: its segment has exactly its expanded length.
            by_id = {s.id: s for s in group}
            for seg, sid in enumerate(row, start=1):
                assert int((batch.segment_ids[r] == seg).sum()) == by_id[sid].expanded_length
    assert sorted(seen) == sorted(s.id for s in samples)
