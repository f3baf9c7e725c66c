"""inspect-data: one JSON line per record with the documented keys, then a summary."""

import json
import os

import pytest

from manager_jax.data import inspect as inspect_data
from manager_jax.data.records import write_records
from manager_jax.data.synthetic import make_synthetic_dataset, write_bad_examples

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
KEYS = {"id", "image_sizes", "num_crops", "image_tokens", "text_tokens", "supervised_tokens", "seq_len", "skipped", "detail"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    syn = make_synthetic_dataset(str(root), num_records=6, seed=2, sizes=[(640, 480)])
    bad = write_bad_examples(str(root))
    records = syn.records + [r for r, _ in bad]
    path = str(root / "all.json")
    write_records(path, records)
    cfg = root / "cfg.py"
    cfg.write_text(
        "from types import SimpleNamespace\n"
        "from manager_jax.config import tiny\n"
        "from manager_jax.data.pipeline import DataConfig\n"
        "def get_config():\n"
        f"    return SimpleNamespace(model=tiny(), data=DataConfig(data_path={path!r}, image_folder={str(root)!r}))\n"
    )
    return root, str(cfg), records, bad


def test_json_lines_have_the_keys_and_a_summary(setup, capsys):
    root, cfg, records, bad = setup
    assert inspect_data.main(["--config", cfg, "--json", "--set", "data.seq_len=2000"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    rows, summary = lines[:-1], lines[-1]["summary"]
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    for row in rows:
        assert set(row) == KEYS
    by_id = {r["id"]: r for r in rows}
    for record, reason in bad:
        assert by_id[record["id"]]["skipped"] == reason
        assert (by_id[record["id"]]["detail"] is None) == (reason is None)  # what was wrong, for each bad record
    missing = next(r for r, reason in bad if reason == "missing_image")
    assert f"no file '{root / missing['image']}'" in by_id[missing["id"]]["detail"]
    assert summary["skip_details"]["missing_image"] == f"record {missing['id']}: {by_id[missing['id']]['detail']}"
    # A 640x480 image in anyres_max_9: 2929 image tokens, 5 crops (SPEC §3.7); > 2000 -> too_long.
    big = [r for r in rows if r["image_sizes"] == [[640, 480]]]
    assert big and all(r["image_tokens"] == 2929 and r["num_crops"] == 5 and r["skipped"] == "too_long" for r in big)
    for r in big:
        assert r["seq_len"] == r["text_tokens"] + r["image_tokens"]
    expected_skips = sum(1 for _, reason in bad if reason) + len(big)
    assert summary["records"] == len(records) and summary["skipped"] == expected_skips
    assert summary["ok"] == len(records) - expected_skips
    assert summary["skip_reasons"]["too_long"] == len(big)
    assert sum(summary["seq_len_histogram"].values()) == summary["ok"]


def test_limit_data_override_and_table(setup, capsys, tmp_path):
    root, cfg, records, _ = setup
    only = str(tmp_path / "two.json")
    write_records(only, records[:2])
    assert inspect_data.main(["--config", cfg, "--data", only, "--image-folder", str(root), "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["id", "sizes", "crops"]
    assert records[0]["id"] in out and records[1]["id"] not in out
    assert '"records": 1' in out


def test_strict_stops_at_the_first_bad_record(setup, capsys):
    _, cfg, _, _ = setup
    assert inspect_data.main(["--config", cfg, "--json", "--strict"]) == 1
    assert "skipped" in capsys.readouterr().err


def test_bad_input_is_one_error_line_and_exit_status_2(setup, capsys, tmp_path):
    root, cfg, _, _ = setup
    (tmp_path / "obj.json").write_text('{"id": 1}')
    (tmp_path / "latin1.json").write_bytes('[{"id": "caf\u00e9"}]'.encode("latin-1"))
    (tmp_path / "empty.jsonl").write_text("")
    cases = [
        (["--set", "data.no_such_field=3"], "unknown config key 'data.no_such_field'"),
        (["--data", str(tmp_path / "obj.json")], "obj.json: expected a JSON array of records, got dict"),
        (["--data", str(tmp_path / "latin1.json")], "latin1.json: not UTF-8 text"),
        (["--data", str(tmp_path / "empty.jsonl")], "empty.jsonl: no records"),
        (["--data", str(tmp_path / "missing.json")], "data file not found"),
        (["--data", str(tmp_path / "missing.yaml")], "missing.yaml"),
        (["--image-folder", str(tmp_path / "no_dir")], "no_dir': no such directory"),
        (["--limit", "-1"], "--limit must be >= 0, got -1"),  # it summarised '"records": -1'
    ]
    for args, message in cases:
        assert inspect_data.main(["--config", cfg, "--json", *args]) == 2, args
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.startswith("error: ") and message in captured.err, (args, captured.err)
        assert len(captured.err.splitlines()) == 1


@pytest.mark.parametrize("case", ["missing_config", "no_data_in_recipe", "unknown_recipe"])
def test_a_bad_config_is_one_error_line_and_status_2(setup, tmp_path, capsys, case):
    """As every command (README, manager_jax/exit_status.py): bad input is one `error:` line, exit 2."""
    _, cfg, _, _ = setup
    args = {
        "missing_config": ["--config", str(tmp_path / "nope.py")],
        "no_data_in_recipe": ["--config", os.path.join(CONFIGS, "demo.py")],
        "unknown_recipe": ["--config", os.path.join(CONFIGS, "llava_ov.py") + ":stage9_x_1b"],
    }[case]
    assert inspect_data.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_run_recipe_configs_load_through_the_recipe_loader(setup, tmp_path, capsys):
    recipe = pytest.importorskip("manager_jax.train.recipe")
    root, _, records, _ = setup
    cfg = tmp_path / "recipe_cfg.py"
    cfg.write_text(
        "from manager_jax.config import tiny\n"
        "from manager_jax.data.pipeline import DataConfig\n"
        "from manager_jax.train.recipe import TrainConfig\n"
        "def get_config():\n"
        "    return TrainConfig(model=tiny('manager'), data=DataConfig(seq_len=1024))\n"
    )
    assert recipe.load_recipe(str(cfg)).data.seq_len == 1024
    args = ["--config", str(cfg), "--data", str(root / "all.json"), "--image-folder", str(root), "--json", "--limit", "3"]
    assert inspect_data.main(args + ["--set", "data.seq_len=700"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()][:-1]
    # Square mode (the "manager" variant): one crop and 729 tokens per image; 700 < 729 -> too_long.
    with_image = [r for r in rows if r["image_sizes"]]
    assert with_image and all(r["num_crops"] == 1 and r["image_tokens"] == 729 for r in with_image)
    assert all(r["skipped"] == "too_long" for r in with_image)


def test_supervised_tokens_are_the_targets_training_keeps_after_truncation(setup, capsys, tmp_path):
    # An anyres 640x480 image takes 2929 tokens: a row of 2000 cut by truncation keeps no answer.
    import numpy as np

    from manager_jax.batch import assemble_batch
    from manager_jax.config import tiny
    from manager_jax.data.pipeline import DataConfig, sample_options
    from manager_jax.data.samples import process_record
    from manager_jax.data.tokenizer import load_tokenizer

    root, cfg, records, _ = setup
    record = next(r for r in records if isinstance(r.get("image"), str))
    one = str(tmp_path / "one.json")
    write_records(one, [record])
    for seq_len in (2000, 4096):
        argv = ["--config", cfg, "--json", "--data", one, "--set", "data.pack=False", "--set", f"data.seq_len={seq_len}"]
        assert inspect_data.main(argv) == 0
        row = json.loads(capsys.readouterr().out.splitlines()[0])
        assert row["id"] == record["id"] and row["skipped"] is None
        data = DataConfig(data_path="unused", image_folder=str(root), pack=False, seq_len=seq_len)
        sample = process_record(record, load_tokenizer(), sample_options(data, tiny()))
        batch = assemble_batch([sample], rows=1, seq_len=seq_len, max_crops=8, max_image_tokens=4000, pack=False,
                               grid_type=None, query_type=None, truncate=True)
        same = batch.segment_ids[:, 1:] == batch.segment_ids[:, :-1]
        targets = int(((batch.labels[:, 1:] != -100) & same & (batch.segment_ids[:, :-1] != 0)).sum())
        assert row["supervised_tokens"] == targets
    assert targets > 0  # the 4096 row keeps the answer
