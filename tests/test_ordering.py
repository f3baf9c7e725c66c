"""group_by_modality_length: the original sampler's order, and the pipeline placing it on shards."""

import math

import numpy as np
import pytest

from manager_jax.config import tiny
from manager_jax.data import ordering
from manager_jax.data.pipeline import DataConfig, make_train_iterator
from manager_jax.data.records import JsonRecords
from manager_jax.data.synthetic import make_synthetic_dataset
from manager_jax.data.tokenizer import load_tokenizer


# ---- a plain transcription of LLaVA-NeXT's llava_trainer.py sampler (lists, a linear min scan),
# fed the permutations that our implementation drew, in the order it drew them.
def reference_even_chunks(indices, lengths, num_chunks):
    if len(indices) % num_chunks != 0:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks = [[] for _ in range(num_chunks)]
    totals = [0] * num_chunks
    for index in indices:
        shortest = totals.index(min(totals))
        chunks[shortest].append(index)
        totals[shortest] += lengths[index]
        if len(chunks[shortest]) == per_chunk:
            totals[shortest] = float("inf")
    return chunks


def reference_length_grouped(lengths, batch_size, world_size, perms):
    indices = list(perms.pop(0))
    mega = world_size * batch_size
    megabatches = [indices[i:i + mega] for i in range(0, len(lengths), mega)]
    megabatches = [sorted(m, key=lambda i: lengths[i], reverse=True) for m in megabatches]
    megabatches = [reference_even_chunks(m, lengths, world_size) for m in megabatches]
    return [i for m in megabatches for batch in m for i in batch]


def reference_modality_grouped(lengths, batch_size, world_size, perms):
    if all(x > 0 for x in lengths) or all(x < 0 for x in lengths):
        return reference_length_grouped(lengths, batch_size, world_size, perms)
    mm_indices, mm_lengths = zip(*[(i, x) for i, x in enumerate(lengths) if x > 0])
    lang_indices, lang_lengths = zip(*[(i, -x) for i, x in enumerate(lengths) if x < 0])
    mm = [mm_indices[i] for i in reference_length_grouped(mm_lengths, batch_size, world_size, perms)]
    lang = [lang_indices[i] for i in reference_length_grouped(lang_lengths, batch_size, world_size, perms)]
    mega = world_size * batch_size
    mm_mb = [mm[i:i + mega] for i in range(0, len(mm), mega)]
    lang_mb = [lang[i:i + mega] for i in range(0, len(lang), mega)]
    additional = mm_mb[-1] + lang_mb[-1]
    megabatches = mm_mb[:-1] + lang_mb[:-1]
    megabatches = [megabatches[i] for i in perms.pop(0)]
    if additional:
        megabatches.append(sorted(additional))
    return [i for m in megabatches for i in m]


class RecordingRng:
    """numpy's generator, keeping each permutation it hands out."""

    def __init__(self, seed):
        self.rng, self.perms = np.random.default_rng(seed), []

    def permutation(self, n):
        perm = self.rng.permutation(n)
        self.perms.append(perm.tolist())
        return perm


def dealt_whole(lengths, window):
    """Records in the megabatches dealt whole: all but the last of each modality (merged at the end)."""
    counts = [int(np.sum(lengths > 0)), int(np.sum(lengths < 0))]
    return sum(-(-c // window) - 1 for c in counts) * window


def random_lengths(rng, n, text_share):
    words = rng.integers(1, 40, n)
    words[rng.random(n) < 0.3] = rng.integers(1, 4)  # many ties: the sort must be stable
    return np.where(rng.random(n) < text_share, -words, words)


@pytest.mark.parametrize("n,batch,world,text_share", [
    (203, 2, 4, 0.3),    # partial last megabatches of both modalities
    (96, 2, 6, 0.25),    # 72 image + 24 text records: a full last megabatch goes to the end too
    (50, 3, 4, 0.0),     # one modality: no merging
    (37, 2, 5, 1.0),
    (10, 4, 4, 0.5),     # fewer records than one megabatch
])
def test_order_equals_the_original_sampler(n, batch, world, text_share):
    lengths = random_lengths(np.random.default_rng(n), n, text_share)
    if n == 96:
        lengths = np.abs(lengths)
        lengths[72:] *= -1
    rng = RecordingRng(n)
    ours = ordering.modality_grouped(lengths, batch, world, rng)
    expected = reference_modality_grouped(lengths.tolist(), batch, world, list(rng.perms))
    assert ours.tolist() == expected
    assert sorted(expected) == list(range(n))


def test_full_steps_are_single_modality_and_laid_out_as_the_originals_device_batches():
    shards, rows, accum = 2, 2, 3
    window = shards * rows * accum
    lengths = random_lengths(np.random.default_rng(5), 150, 0.35)
    rng_seed = [7, 0]
    grouped = ordering.modality_grouped(lengths, rows, shards * accum, np.random.default_rng(rng_seed))
    order = ordering.grouped_epoch_order(lengths, seed=7, epoch=0, shards=shards, rows=rows, accum=accum)
    assert sorted(order.tolist()) == list(range(150))
    full = len(order) // window * window
    dealt = dealt_whole(lengths, window)
    for start in range(0, full, window):
        step = order[start:start + window]
        signs = set(np.sign(lengths[step]).tolist())
        if start < dealt:
            assert len(signs) == 1, start
        # The pipeline deals position p to shard p % shards, rows of a shard batch in a row:
        # shard k's accumulation step a holds chunk a * shards + k of the original's megabatch.
        for k in range(shards):
            stream = step[k::shards]
            for a in range(accum):
                chunk = a * shards + k
                expected = grouped[start + chunk * rows:start + (chunk + 1) * rows]
                assert stream[a * rows:(a + 1) * rows].tolist() == expected.tolist()
    # Another epoch draws another order.
    again = ordering.grouped_epoch_order(lengths, seed=7, epoch=1, shards=shards, rows=rows, accum=accum)
    assert again.tolist() != order.tolist()


def test_modality_length_as_the_original_dataset():
    image = {"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat is  it?"},
                                                 {"from": "gpt", "value": "A red\tsquare."}]}
    assert ordering.modality_length(image) == 7  # 4 + 3 words
    assert ordering.modality_length({**image, "image": None}) == 7  # the key decides, as `"image" in sample`
    text = {"conversations": image["conversations"]}
    assert ordering.modality_length(text) == -7
    assert ordering.modality_length({"video": "v.mp4", "conversations": []}) == 1  # placed, skipped later
    assert ordering.modality_length({"_error": "invalid JSON line"}) == -1


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("grouped")
    syn = make_synthetic_dataset(str(root), num_records=40, seed=2, sizes=[(384, 384), (500, 300)],
                                 weights=[1.0, 1.0, 1.0])
    return str(root), syn.records_path


@pytest.mark.parametrize("accum,workers", [(2, 0), (3, 2)])  # workers: each batches a slice of the shard
def test_the_pipeline_trains_each_step_on_one_megabatch(mixed_data, accum, workers):
    root, path = mixed_data
    shards, rows = 2, 2
    cfg = DataConfig(data_path=path, image_folder=root, rows_per_host=rows, seq_len=2048, max_crops=2,
                     max_image_tokens=1500, pack=False, seed=4, num_epochs=1, group_by_modality_length=True,
                     worker_count=workers)
    model, tok = tiny(variant="manager"), load_tokenizer()
    source = JsonRecords(path)
    its = [make_train_iterator(cfg, model, tok, process_index=k, process_count=shards, source=source, accum=accum)
           for k in range(shards)]
    lengths = ordering.modality_lengths(source)
    grouped = ordering.modality_grouped(lengths, rows, shards * accum, np.random.default_rng([4, 0]))
    ids = [record["id"] for record in source]
    window = shards * rows * accum
    # Workers interleave their batches: the placement repeats every lcm(accum, workers) batches of a
    # shard, and the steps of a last partial repeat keep the grouped order without the placement.
    per_repeat = math.lcm(accum, max(workers, 1)) // accum
    steps = len(source) // (window * per_repeat) * per_repeat
    assert steps >= 2
    modalities = []
    for step in range(steps):
        megabatch = grouped[step * window:(step + 1) * window]
        for a in range(accum):
            for k in range(shards):
                batch = next(its[k])
                got = [sid for row in batch.sample_ids for sid in row]
                chunk = megabatch[(a * shards + k) * rows:(a * shards + k + 1) * rows]
                assert got == [ids[i] for i in chunk], (step, a, k)
        modalities.append(set(np.sign(lengths[megabatch]).tolist()))
    single = dealt_whole(lengths, window) // window
    assert all(len(m) == 1 for m in modalities[:single])
    if accum == 2:
        assert single >= 2 and {1} in modalities[:single] and {-1} in modalities[:single]  # steps of both kinds
    for it in its:
        it.close()


def test_grouping_needs_shuffle():
    with pytest.raises(ValueError, match="group_by_modality_length"):
        DataConfig(data_path="x.json", shuffle=False, group_by_modality_length=True)


def test_resume_inside_a_grouped_epoch_gives_the_same_next_batches(mixed_data):
    import json

    root, path = mixed_data
    cfg = DataConfig(data_path=path, image_folder=root, rows_per_host=2, seq_len=2048, max_crops=2,
                     max_image_tokens=1500, pack=False, seed=9, num_epochs=None, group_by_modality_length=True)
    model, tok = tiny(variant="manager"), load_tokenizer()
    it = make_train_iterator(cfg, model, tok, process_index=1, process_count=2, accum=3)
    for _ in range(9):  # into the second epoch (20 records per shard, 2 per batch)
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it).sample_ids for _ in range(4)]
    resumed = make_train_iterator(cfg, model, tok, process_index=1, process_count=2, accum=3)
    resumed.set_state(state)
    assert [next(resumed).sample_ids for _ in range(4)] == expected


def test_a_skipped_record_leaves_its_row_empty_and_the_steps_stay_aligned(mixed_data, tmp_path):
    import json

    root, path = mixed_data
    with open(path) as f:
        records = json.load(f)
    broken = next(i for i, r in enumerate(records) if r.get("image"))
    records[broken] = dict(records[broken], image="no/such/image.jpg")
    bad_path = tmp_path / "records.json"
    bad_path.write_text(json.dumps(records))
    shards, rows, accum = 2, 2, 2
    cfg = DataConfig(data_path=str(bad_path), image_folder=root, rows_per_host=rows, seq_len=2048, max_crops=2,
                     max_image_tokens=1500, pack=False, seed=4, num_epochs=1, group_by_modality_length=True)
    model, tok = tiny(variant="manager"), load_tokenizer()
    source = JsonRecords(str(bad_path))
    its = [make_train_iterator(cfg, model, tok, process_index=k, process_count=shards, source=source, accum=accum)
           for k in range(shards)]
    grouped = ordering.modality_grouped(ordering.modality_lengths(source), rows, shards * accum,
                                        np.random.default_rng([4, 0]))
    ids = [record["id"] for record in records]
    window = shards * rows * accum
    seen_skip = False
    for step in range(len(records) // window):
        for a in range(accum):
            for k in range(shards):
                batch = next(its[k])
                chunk = grouped[step * window + (a * shards + k) * rows:][:rows]
                expected = [ids[i] for i in chunk if i != broken]
                assert [sid for row in batch.sample_ids for sid in row] == expected
                seen_skip |= len(expected) < rows
    assert seen_skip
    assert sum(it.skips.total for it in its) == 1
