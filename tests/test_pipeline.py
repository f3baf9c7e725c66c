"""Grain pipeline: determinism, exact resume from saved state, per-host sharding, skips, workers."""

import itertools
import json

import numpy as np
import pytest

from manager_jax.batch import Batch
from manager_jax.config import tiny
from manager_jax.data.pipeline import DataConfig, make_train_iterator
from manager_jax.data.records import RecordFormatError, write_records
from manager_jax.data.samples import SkipSample
from manager_jax.data.synthetic import make_synthetic_dataset, write_bad_examples
from manager_jax.data.tokenizer import load_tokenizer

SIZES = [(400, 300), (300, 400), (384, 384), (640, 480), (500, 200)]
SQUARE = tiny(variant="manager")  # one crop per image: for tests that only look at which records come out


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    syn = make_synthetic_dataset(str(root), num_records=30, seed=11, sizes=SIZES, multi_image_fraction=0.2)
    return str(root), syn.records_path, [r["id"] for r in syn.records]


def config(data, **kw):
    root, path, _ = data
    base = dict(data_path=path, image_folder=root, rows_per_host=2, seq_len=4096, max_crops=8, max_image_tokens=6000,
                seed=3, num_epochs=1)
    base.update(kw)
    return DataConfig(**base)


def run(cfg, tok, model=None, index=0, count=1):
    return make_train_iterator(cfg, model or tiny(), tok, process_index=index, process_count=count)


def assert_same(a, b):
    assert a.sample_ids == b.sample_ids
    for name in Batch.ARRAY_FIELDS:
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


def ids_of(batches):
    return [sid for b in batches for row in b.sample_ids for sid in row]


def test_one_epoch_covers_every_record_once_with_fixed_shapes(data, tok):
    batches = list(run(config(data), tok))
    _, _, all_ids = data
    assert sorted(ids_of(batches)) == sorted(all_ids)
    for b in batches:
        assert b.input_ids.shape == (2, 4096) and b.pixel_values.shape == (8, 384, 384, 3)
        assert b.plan_dst.shape == (6000,) and b.query_mask.shape == (2, 4096)


def test_deterministic_for_a_seed_and_different_across_seeds(data, tok):
    first, second = list(run(config(data), tok)), list(run(config(data), tok))
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert_same(a, b)
    other = ids_of(run(config(data, seed=4), tok, model=SQUARE))
    assert other != ids_of(first) and sorted(other) == sorted(ids_of(first))
    assert ids_of(run(config(data, shuffle=False, pack=False), tok, model=SQUARE)) == data[2]  # file order


def test_resume_from_saved_state_gives_the_same_next_batches(data, tok):
    cfg = config(data, num_epochs=None)
    it = run(cfg, tok)
    for _ in range(2):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # the state must survive a JSON checkpoint
    expected = [next(it) for _ in range(4)]
    resumed = run(cfg, tok)
    resumed.set_state(state)
    for a, b in zip(expected, [next(resumed) for _ in range(4)]):
        assert_same(a, b)


def test_a_state_does_not_restore_over_another_number_of_records(data, tok, tmp_path):
    from manager_jax.data.pipeline import DataChangedError

    root, path, _ = data
    it = run(config(data, num_epochs=None), tok)
    next(it)
    state = json.loads(json.dumps(it.get_state()))
    with open(path) as f:
        records = json.load(f)
    fewer = tmp_path / "fewer.json"
    fewer.write_text(json.dumps(records[:-1]))
    with pytest.raises(DataChangedError, match=f"its run read {len(records)} records, the data now has {len(records) - 1}"):
        run(config(data, num_epochs=None, data_path=str(fewer)), tok).set_state(state)


def test_hosts_get_disjoint_shares_that_cover_the_epoch(data, tok):
    shares = [ids_of(run(config(data), tok, model=SQUARE, index=i, count=3)) for i in range(3)]
    for a, b in itertools.combinations(shares, 2):
        assert not set(a) & set(b)
    assert sorted(sum(shares, [])) == sorted(data[2])
    assert all(len(s) == 10 for s in shares)


def test_epochs_reshuffle(data, tok):
    ids = ids_of(run(config(data, num_epochs=2, pack=False), tok, model=SQUARE))
    assert len(ids) == 60 and sorted(ids[:30]) == sorted(ids[30:]) and ids[:30] != ids[30:]


def test_bad_records_are_counted_not_fatal_and_strict_raises(data, tok, tmp_path):
    root, path, all_ids = data
    cases = write_bad_examples(root)
    with open(path) as f:
        good = json.load(f)
    mixed = str(tmp_path / "mixed.json")
    # Entries of the array that are no records: a null reached Grain, which drops it uncounted.
    write_records(mixed, good + [r for r, _ in cases] + [None, 7])
    it = run(config(data, data_path=mixed), tok, model=SQUARE)
    seen = ids_of(list(it))
    expected_ok = set(all_ids) | {r["id"] for r, reason in cases if reason is None}
    assert set(seen) == expected_ok
    expected_counts = {"bad_record": 2}
    for _, reason in cases:
        if reason:
            expected_counts[reason] = expected_counts.get(reason, 0) + 1
    assert it.skips.summary()["by_reason"] == expected_counts
    assert it.samples == len(seen)  # what the training loop's skip fraction is measured against
    # The counts travel with the iterator state, so a resumed run's skip fraction covers the whole run.
    resumed = run(config(data, data_path=mixed), tok, model=SQUARE)
    resumed.set_state(it.get_state())
    assert resumed.samples == len(seen) and resumed.skips.counts == it.skips.counts
    old_state = {k: v for k, v in it.get_state().items() if k != "samples"}  # saved before samples were counted
    resumed.set_state(old_state)
    assert resumed.samples == 0 and resumed.skips.total == 0
    with pytest.raises(SkipSample):
        list(run(config(data, data_path=mixed, strict=True), tok, model=SQUARE))


def test_data_whose_records_are_all_bad_is_a_data_error(data, tok, tmp_path):
    root, _, _ = data
    records = [{"id": f"b{i}", "image": "gone.png", "conversations": [{"from": "human", "value": "<image>\nq"},
                                                                      {"from": "gpt", "value": "a"}]} for i in range(5)]
    write_records(str(tmp_path / "bad.json"), records)
    it = run(config(data, data_path=str(tmp_path / "bad.json"), num_epochs=None), tok, model=SQUARE)
    with pytest.raises(RecordFormatError, match=r"1001 records in a row were skipped \(last: record 'b\d' skipped "
                                                 r"\(missing_image\): no file '.*gone.png'\)"):
        next(it)


def test_a_shard_without_a_good_record_still_counts_its_skips(data, tok, tmp_path):
    # No batch ever comes out, so the skips cannot travel with one; they must still be counted
    # (the training loop's skip limit and summary read them).
    bad = [{"id": f"b{i}", "image": "gone.png", "conversations": [{"from": "human", "value": "<image>\nq"},
                                                                  {"from": "gpt", "value": "a"}]} for i in range(3)]
    write_records(str(tmp_path / "bad.json"), bad)
    it = run(config(data, data_path=str(tmp_path / "bad.json"), shuffle=False), tok, model=SQUARE)
    assert list(it) == []
    assert it.skips.counts == {"missing_image": 3} and it.skips.examples["missing_image"] == ["b0", "b1", "b2"]


def test_too_long_samples_are_skipped_when_packing_and_cut_when_not(data, tok):
    # Square mode: 729 tokens per image, so two-image records (> 1458 tokens) are too long.
    packed = run(config(data, seq_len=1200), tok, model=SQUARE)
    kept = ids_of(list(packed))
    assert packed.skips.counts.get("too_long", 0) > 0
    unpacked = run(config(data, seq_len=1200, pack=False), tok, model=SQUARE)
    batches = list(unpacked)
    assert all(b.input_ids.shape == (2, 1200) for b in batches)
    assert unpacked.skips.total == 0 and len(ids_of(batches)) == 30 > len(kept)
    assert any((b.segment_ids[:, -1] > 0).any() for b in batches)  # some rows were cut at S


def test_adaptive_manager_batches_carry_a_query_mask(data, tok):
    model = tiny(manager_type="adaptive_cross_zerouni")
    b = next(run(config(data), tok, model=model))
    assert b.query_mask.any()
    assert not (b.query_mask & (b.segment_ids == 0)).any()


def test_worker_process_gives_the_same_batches(data, tok):
    cfg = config(data, num_epochs=1)
    in_process = list(run(cfg, tok))
    it = run(DataConfig(**{**cfg.__dict__, "worker_count": 1}), tok)
    try:
        with_worker = list(it)
    finally:
        it.close()
    assert len(in_process) == len(with_worker)
    for a, b in zip(in_process, with_worker):
        assert_same(a, b)
