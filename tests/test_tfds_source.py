"""ArrayRecord conversion (tools/prepare_data.py) and reading: records and image bytes round-trip."""

import json
import os
import shutil

import numpy as np
import pytest

from manager_jax.batch import Batch
from manager_jax.config import tiny
from manager_jax.data import tfds_source
from manager_jax.data.pipeline import DataConfig, make_train_iterator
from manager_jax.data.records import RecordFormatError, open_records, write_records
from manager_jax.data.samples import SkipSample
from manager_jax.data.synthetic import make_synthetic_dataset
from manager_jax.data.tokenizer import load_tokenizer
from tools import prepare_data


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ar")
    syn = make_synthetic_dataset(str(root), num_records=9, seed=5, sizes=[(400, 300), (300, 400)], multi_image_fraction=0.4)
    records = list(syn.records)
    records.insert(3, {"id": "gone", "image": "images/nope.jpg", "conversations": records[0]["conversations"]})
    # A text-only record's "<image>" is plain text (a converted one read as an image record was
    # skipped), and a cut-off emoji's lone surrogate (the conversion crashed on it).
    records.append({"id": "html", "conversations": [{"from": "human", "value": "What does <image> mean in HTML?"},
                                                    {"from": "gpt", "value": "A picture."}]})
    records.append({"id": "cut", "conversations": [{"from": "human", "value": "hi \ud83d there"},
                                                   {"from": "gpt", "value": "Hello."}]})
    path = str(root / "with_missing.jsonl")
    write_records(path, records)
    return root, path, records


def test_round_trip_keeps_records_and_image_bytes(dataset, tmp_path):
    root, path, records = dataset
    out = str(tmp_path / "ar")
    result = prepare_data.convert_records(open_records(path), out, image_folder=str(root), num_shards=2)
    assert result["written"] == len(records) - 1
    assert result["skipped"]["by_reason"] == {"missing_image": 1}
    src = tfds_source.ArrayRecordRecords(out)
    kept = [r for r in records if r["id"] != "gone"]
    assert len(src) == len(kept)
    for i, original in enumerate(kept):
        got = src[i]
        blobs = got.pop("image_bytes", [])  # a text-only record has none
        assert got == original
        names = original.get("image", [])
        names = [names] if isinstance(names, str) else names
        assert len(blobs) == len(names)
        for name, blob in zip(names, blobs):
            with open(os.path.join(root, name), "rb") as f:
                assert blob == f.read()
    with open(os.path.join(out, tfds_source.INDEX_FILE)) as f:
        index = json.load(f)
    assert index["splits"]["train"]["num_records"] == len(kept) and len(index["splits"]["train"]["shards"]) == 2
    assert sum(index["splits"]["train"]["shard_lengths"]) == len(kept)


def test_a_wrong_split_or_format_is_a_record_format_error(dataset, tmp_path):
    root, path, _ = dataset
    out = str(tmp_path / "ar")
    prepare_data.convert_records(open_records(path), out, image_folder=str(root))
    with pytest.raises(RecordFormatError, match=r"has no split 'validation'; it has \['train'\]"):
        tfds_source.ArrayRecordRecords(out, "validation")
    index_path = os.path.join(out, tfds_source.INDEX_FILE)
    with open(index_path) as f:
        index = json.load(f)
    with open(index_path, "w") as f:
        json.dump(dict(index, format="something_else"), f)
    with pytest.raises(RecordFormatError, match="'something_else' v1 is not"):
        tfds_source.ArrayRecordRecords(out)


def test_tfds_reads_the_layout(dataset, tmp_path):
    import tensorflow_datasets as tfds

    root, path, records = dataset
    out = str(tmp_path / "ar")
    prepare_data.convert_records(open_records(path), out, image_folder=str(root))
    builder = tfds.builder_from_directory(out)
    ds = builder.as_data_source("train")
    assert len(ds) == len(records) - 1
    first = ds[0]
    assert first["id"] == records[0]["id"].encode()
    assert json.loads(first["record_json"])["conversations"] == records[0]["conversations"]


def test_pipeline_over_arrayrecord_equals_pipeline_over_json(dataset, tmp_path):
    root, path, _ = dataset
    out = str(tmp_path / "ar")
    prepare_data.convert_records(open_records(path), out, image_folder=str(root))
    tok = load_tokenizer()
    model = tiny()
    common = dict(rows_per_host=2, seq_len=4096, max_crops=12, max_image_tokens=8000, shuffle=False, num_epochs=1)
    from_json = list(make_train_iterator(DataConfig(data_path=path, image_folder=str(root), **common), model, tok,
                                         process_index=0, process_count=1))
    from_ar = list(make_train_iterator(DataConfig(data_path=out, **common), model, tok, process_index=0, process_count=1))
    assert len(from_json) == len(from_ar) > 0
    for a, b in zip(from_json, from_ar):
        assert a.sample_ids == b.sample_ids
        for name in Batch.ARRAY_FIELDS:
            assert np.array_equal(getattr(a, name), getattr(b, name)), name


def test_strict_conversion_fails_and_leaves_nothing(dataset, tmp_path):
    root, path, _ = dataset
    out = str(tmp_path / "strict")
    with pytest.raises(SkipSample, match="missing_image"):
        prepare_data.convert_records(open_records(path), out, image_folder=str(root), strict=True)
    assert not os.path.exists(out) and not os.path.exists(out + ".tmp")


def test_an_existing_out_created_after_the_cli_check_names_the_flag(dataset, tmp_path):
    """convert_records' own refusal (an --out created after main's check) reaches the CLI user."""
    root, path, _ = dataset
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError) as info:
        prepare_data.convert_records(open_records(path), str(tmp_path / "taken"), image_folder=str(root))
    assert "--overwrite" in str(info.value) and "overwrite=True" not in str(info.value)


def test_cli(dataset, tmp_path, capsys):
    root, path, records = dataset
    out = str(tmp_path / "cli")
    assert prepare_data.main(["--data", path, "--image-folder", str(root), "--out", out, "--verify-images"]) == 0
    assert json.loads(capsys.readouterr().out)["written"] == len(records) - 1


@pytest.mark.parametrize("case, status, message", [
    ("exists", 2, "exists; pass --overwrite"),
    ("no_data", 2, "data file not found"),
    ("no_image_folder", 2, "is not a directory"),
    # --out under a file: it failed when the write began, with status 1
    ("out_under_a_file", 2, "--out: cannot create"),
    ("strict", 1, "skipped (missing_image)"),
    # An image folder that exists but is the wrong one: every image record would be left out.
    ("wrong_image_folder", 1, "left out, more than --max-skip-fraction=0.5: missing_image"),
    # Training refuses a data set without records: converting one is refused up front.
    ("empty", 2, "empty.json: no records"),
    ("too_many_shards", 2, "--num-shards 100 is more than the 12 records"),
])
def test_cli_errors_are_one_line_with_the_exit_status_and_write_nothing(dataset, tmp_path, capsys, case, status,
                                                                         message):
    root, path, _ = dataset
    out = tmp_path / "cli"
    args = {"data": path, "image-folder": str(root), "out": str(out)}
    extra = []
    if case == "exists":
        out.mkdir()
    elif case == "no_data":
        args["data"] = str(tmp_path / "nope.json")
    elif case == "no_image_folder":
        args["image-folder"] = str(tmp_path / "nope")
    elif case == "wrong_image_folder":
        args["image-folder"] = str(tmp_path)
    elif case == "out_under_a_file":
        blocker = tmp_path.parent / f"{tmp_path.name}_file"
        blocker.write_text("mine")
        args["out"] = str(blocker / "cli")
    elif case == "empty":
        empty = tmp_path.parent / f"{tmp_path.name}_data" / "empty.json"
        empty.parent.mkdir()
        empty.write_text("[]")
        args["data"] = str(empty)
    elif case == "too_many_shards":
        extra = ["--num-shards", "100"]
    else:
        extra = ["--strict"]
    argv = [a for k, v in args.items() for a in (f"--{k}", v)] + extra
    assert prepare_data.main(argv) == status
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert os.listdir(tmp_path) == (["cli"] if case == "exists" else [])
    if case == "exists":
        assert os.listdir(out) == []


@pytest.mark.parametrize("split", ["", "a/b", "train[:5]", "a b", "train-2"])
def test_a_split_that_is_no_file_name_part_is_a_usage_error(dataset, tmp_path, capsys, split):
    """The split names the shard files (`llava-<split>.array_record-...`): refused before any record
    is read (it failed with a traceback after all of them were)."""
    root, path, _ = dataset
    with pytest.raises(SystemExit) as exit_:
        prepare_data.main(["--data", path, "--image-folder", str(root), "--out", str(tmp_path / "o"), "--split", split])
    assert exit_.value.code == 2 and "--split must be letters, digits and '_'" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_shards_are_written_one_file_at_a_time(tmp_path):
    """Thousands of shards opened at once ran into the open-file limit, leaving a partial folder:
    one shard file is open at any time, and every shard exists, empty ones too."""
    out = tmp_path / "ar"
    writer = tfds_source.ArrayRecordWriterSet(str(out), "train", num_records=40, num_shards=25)

    def open_shards():
        names = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                 if os.path.exists(f"/proc/self/fd/{fd}")]
        return [n for n in names if n.startswith(str(out))]

    most = 0
    for i in range(30):  # 10 of the 40 left out: the last shards get no record
        writer.write(b"record %d" % i)
        most = max(most, len(open_shards()))
    writer.close()
    assert most == 1 and open_shards() == []
    assert sorted(os.listdir(out)) == sorted(writer.shard_files) and len(writer.shard_files) == 25
    assert writer.shard_lengths[-1] == 0 and sum(writer.shard_lengths) == 30


def test_overwrite_never_replaces_a_folder_holding_the_data_or_the_images(dataset, tmp_path, capsys):
    """--out with --overwrite naming the image folder, the data's folder or a folder above them:
    refused before anything is read (the conversion deleted them on its rename)."""
    root, path, _ = dataset
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    data = str(copy / os.path.basename(path))
    before = sorted(os.listdir(copy))
    for out in (copy, copy / "images", tmp_path):
        code = prepare_data.main(["--data", data, "--image-folder", str(copy), "--out", str(out), "--overwrite"])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: --out: refusing to overwrite") and "\n" not in err.strip(), err
    assert sorted(os.listdir(copy)) == before and sorted(os.listdir(tmp_path)) == ["copy"]


def test_a_conversion_that_leaves_out_every_record_writes_nothing(dataset, tmp_path, capsys):
    """With --max-skip-fraction 1 and no image found, every record of an all-image set is left out:
    a failure (an empty dataset exited 0, and training refused it later)."""
    root, path, records = dataset
    images_only = tmp_path / "images_only.json"
    images_only.write_text(json.dumps([r for r in records if "image" in r]))
    out = tmp_path / "out"
    code = prepare_data.main(["--data", str(images_only), "--image-folder", str(tmp_path), "--out", str(out),
                              "--max-skip-fraction", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "were left out, every one: missing_image" in err
    assert sorted(os.listdir(tmp_path)) == ["images_only.json"]


def test_max_skip_fraction_one_keeps_what_is_readable(dataset, tmp_path):
    root, path, records = dataset
    out = str(tmp_path / "ar")
    result = prepare_data.convert_records(open_records(path), out, image_folder=str(tmp_path), max_skip_fraction=1)
    text_only = [r for r in records if "image" not in r]
    assert result["written"] == len(text_only) and result["skipped"]["total"] == len(records) - len(text_only)
    assert os.path.isdir(out)


def test_conversion_stores_the_modality_lengths_of_the_records_it_wrote(dataset, tmp_path):
    from manager_jax.data import ordering

    root, path, _ = dataset
    out = str(tmp_path / "ar")
    prepare_data.convert_records(open_records(path), out, image_folder=str(root))
    source = tfds_source.ArrayRecordRecords(out)
    read = [ordering.modality_length(source[i]) for i in range(len(source))]
    assert source.modality_lengths().tolist() == read
    assert {x > 0 for x in read} == {True, False}  # image and text-only records
    assert ordering.modality_lengths(source).tolist() == read


def test_a_mixture_converts_to_the_same_records_in_the_same_order(tmp_path):
    """JSON mixture (JSON + JSONL, first / end / random / P%, a dataset's own image_folder and the
    global one) == its ArrayRecord conversion (3 shards) == TFDS' reader of it, record for record,
    and the pipeline serves the same samples from both, shuffled by the same seed."""
    import tensorflow_datasets as tfds

    from manager_jax.data.mixture import load_mixture

    a = make_synthetic_dataset(str(tmp_path / "a"), num_records=6, seed=1, sizes=[(400, 300)], records_file="a.json")
    b = make_synthetic_dataset(str(tmp_path / "b"), num_records=7, seed=2, sizes=[(300, 400)], multi_image_fraction=0.5)
    write_records(str(tmp_path / "b" / "b.jsonl"), b.records)
    mix_path = tmp_path / "mix.yaml"
    mix_path.write_text(
        "datasets:\n"
        f"  - {{json_path: {tmp_path}/a/a.json, sampling_strategy: 'end:50%', image_folder: {tmp_path}/a}}\n"
        f"  - {{json_path: {tmp_path}/b/b.jsonl, sampling_strategy: 'random:4'}}\n"
        f"  - {{json_path: {tmp_path}/a/a.json, sampling_strategy: 'first:2', image_folder: {tmp_path}/a}}\n"
    )
    mixture = load_mixture(str(mix_path), seed=11)
    expected = [{k: v for k, v in mixture[i].items() if k != "_image_folder"} for i in range(len(mixture))]
    assert len(expected) == 3 + 4 + 2
    assert [r["id"] for r in expected[:3]] == [r["id"] for r in a.records[3:]]
    assert [r["id"] for r in expected[7:]] == [r["id"] for r in a.records[:2]]

    out = str(tmp_path / "ar")
    assert prepare_data.main(["--data", str(mix_path), "--image-folder", str(tmp_path / "b"), "--out", out,
                              "--seed", "11", "--num-shards", "3"]) == 0
    converted = tfds_source.ArrayRecordRecords(out)
    got = [converted[i] for i in range(len(converted))]
    for record in got:
        record.pop("image_bytes", None)
    assert got == expected
    by_tfds = tfds.builder_from_directory(out).as_data_source("train")
    assert [json.loads(by_tfds[i]["record_json"]) for i in range(len(by_tfds))] == expected

    tok = load_tokenizer()
    common = dict(rows_per_host=2, seq_len=4096, max_crops=12, max_image_tokens=8000, shuffle=True, seed=11,
                  num_epochs=1)
    from_json = list(make_train_iterator(DataConfig(mixture=str(mix_path), image_folder=str(tmp_path / "b"), **common),
                                         tiny(), tok, process_index=0, process_count=1))
    from_ar = list(make_train_iterator(DataConfig(data_path=out, **common), tiny(), tok, process_index=0,
                                       process_count=1))
    assert len(from_json) == len(from_ar) > 0
    assert sum(len(ids) for batch in from_json for ids in batch.sample_ids) == len(expected)
    for x, y in zip(from_json, from_ar):
        assert x.sample_ids == y.sample_ids
        for name in Batch.ARRAY_FIELDS:
            assert np.array_equal(getattr(x, name), getattr(y, name)), name
