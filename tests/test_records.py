"""LLaVA record sources: JSON arrays, streaming JSONL, brace patterns, concatenation, subsets."""

import json
import pickle
import random

import pytest

from manager_jax.data.records import (
    ConcatRecords,
    JsonlRecords,
    JsonRecords,
    RecordFormatError,
    SubsetRecords,
    expand_data_path,
    iter_jsonl,
    open_records,
    write_records,
)
from tests.threads import run_racing

RECORDS = [{"id": f"r{i}", "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "é" * i}]}
           for i in range(5)]


def test_json_and_jsonl_give_the_same_records(tmp_path):
    write_records(str(tmp_path / "a.json"), RECORDS)
    write_records(str(tmp_path / "a.jsonl"), RECORDS)
    js, jl = open_records(str(tmp_path / "a.json")), open_records(str(tmp_path / "a.jsonl"))
    assert isinstance(js, JsonRecords) and isinstance(jl, JsonlRecords)
    assert len(js) == len(jl) == 5
    assert [jl[i] for i in (4, 0, 2)] == [RECORDS[4], RECORDS[0], RECORDS[2]]  # random access
    assert [js[i] for i in range(5)] == RECORDS and jl[-1] == RECORDS[-1]
    assert list(iter_jsonl(str(tmp_path / "a.jsonl"))) == RECORDS
    with pytest.raises(IndexError):
        jl[5]


def test_jsonl_skips_blank_lines_and_flags_bad_lines(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n\n{not json\n" + json.dumps(RECORDS[1]) + "\n[1, 2]\n")
    src = JsonlRecords(str(path))
    assert len(src) == 4
    assert src[0] == RECORDS[0] and src[2] == RECORDS[1]
    assert src[1]["id"] == "b.jsonl:3" and "invalid JSON" in src[1]["_error"]
    # Valid JSON that is not an object: named by its line too (it was named by its index).
    assert src[3]["id"] == "b.jsonl:5" and "must be an object" in src[3]["_error"]
    with pytest.raises(RecordFormatError, match="b.jsonl:3"):  # the first bad line
        list(iter_jsonl(str(path)))
    # Pickles without its open file handle (worker processes reopen it).
    clone = pickle.loads(pickle.dumps(src))
    assert clone[2] == RECORDS[1]


def test_json_array_entries_that_are_no_objects_are_named_bad_records(tmp_path):
    """A null (or a number) in the array: a record that the sample step skips and counts, named by
    its index, as a JSONL line that is no object is."""
    path = tmp_path / "c.json"
    path.write_text(json.dumps([RECORDS[0], None, 7]))
    src = JsonRecords(str(path))
    assert src[0] == RECORDS[0]
    assert src[1]["id"] == "c.json[1]" and "must be a JSON object, got null" in src[1]["_error"]
    assert src[2]["id"] == "c.json[2]" and "got a number" in src[2]["_error"]


def test_records_with_a_lone_surrogate_are_written_and_read_back(tmp_path):
    """A cut-off emoji leaves a lone surrogate, which UTF-8 cannot hold: written as a \\u escape
    (the write failed half way), read back as the same string."""
    records = [dict(RECORDS[1], id="cut \ud83d emoji")] + RECORDS[:1]
    for name in ("d.json", "d.jsonl"):
        write_records(str(tmp_path / name), records)
        assert [open_records(str(tmp_path / name))[i] for i in range(2)] == records


def test_jsonl_random_access_is_thread_safe(tmp_path):
    # Grain's read threads share one source; each must get the record it asked for.
    records = [{"id": f"t{i}", "conversations": [{"from": "gpt", "value": "x" * (i * 37 % 500)}]} for i in range(400)]
    write_records(str(tmp_path / "t.jsonl"), records)
    src = JsonlRecords(str(tmp_path / "t.jsonl"))
    wrong = []

    def reader(seed):
        rng = random.Random(seed)
        for _ in range(3000):
            i = rng.randrange(len(records))
            if src[i]["id"] != records[i]["id"]:
                wrong.append(i)

    run_racing(reader, [(seed,) for seed in range(4)])
    assert not wrong, f"{len(wrong)} reads returned another record"


def test_bad_json_files_raise_clear_errors(tmp_path):
    (tmp_path / "obj.json").write_text('{"id": 1}')
    with pytest.raises(RecordFormatError, match="JSON array"):
        open_records(str(tmp_path / "obj.json"))
    (tmp_path / "x.txt").write_text("[]")
    with pytest.raises(RecordFormatError, match="suffix"):
        open_records(str(tmp_path / "x.txt"))
    with pytest.raises(FileNotFoundError):
        open_records(str(tmp_path / "missing.json"))
    (tmp_path / "latin1.json").write_bytes(json.dumps(RECORDS[1:2], ensure_ascii=False).encode("latin-1"))
    with pytest.raises(RecordFormatError, match=r"latin1.json: not UTF-8 text \(byte \d+: b'\\xe9'\)"):
        open_records(str(tmp_path / "latin1.json"))


def test_a_json_file_with_a_utf8_bom_reads_like_its_jsonl_twin(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "w.json").write_bytes(bom + json.dumps(RECORDS, ensure_ascii=False).encode())
    (tmp_path / "w.jsonl").write_bytes(bom + "\n".join(json.dumps(r) for r in RECORDS).encode())
    assert list(open_records(str(tmp_path / "w.json"))) == list(open_records(str(tmp_path / "w.jsonl"))) == RECORDS


def test_brace_pattern_concatenates_files(tmp_path):
    write_records(str(tmp_path / "p1.json"), RECORDS[:2])
    write_records(str(tmp_path / "p2.json"), RECORDS[2:])
    pattern = str(tmp_path / "{p1,p2}.json")
    assert expand_data_path(pattern) == [str(tmp_path / "p1.json"), str(tmp_path / "p2.json")]
    src = open_records(pattern)
    assert [src[i]["id"] for i in range(len(src))] == [r["id"] for r in RECORDS]


def test_concat_and_subset():
    a, b = RecordsList(RECORDS[:3]), RecordsList(RECORDS[3:])
    cat = ConcatRecords([a, RecordsList([]), b])
    assert len(cat) == 5 and [cat[i]["id"] for i in range(5)] == ["r0", "r1", "r2", "r3", "r4"]
    sub = SubsetRecords(cat, [4, 0], image_folder="imgs")
    assert len(sub) == 2 and sub[0]["id"] == "r4" and sub[1]["_image_folder"] == "imgs"
    assert "_image_folder" not in RECORDS[0]  # the source record is not modified


class RecordsList(list):
    pass
