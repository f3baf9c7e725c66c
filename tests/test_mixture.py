"""YAML mixtures: all / first:K / end:K / random:K, K as a count or P%, seeded random."""

import os

import pytest

from manager_jax.data.mixture import MixtureError, load_mixture, resolve_count, select_indices
from manager_jax.data.records import write_records


def test_strategies_select_the_right_indices():
    assert select_indices(10, "all").tolist() == list(range(10))
    assert select_indices(10, "first:3").tolist() == [0, 1, 2]
    assert select_indices(10, "end:3").tolist() == [7, 8, 9]
    assert select_indices(10, "first:30").tolist() == list(range(10))  # more than there is
    assert select_indices(10, "first:0").tolist() == []


@pytest.mark.parametrize(
    "amount, length, expected",
    # ceil(P * len / 100): 0.7 -> 1, 2.5 -> 3, 3.0 -> 3 (no float fuzz), 330, 2.025 -> 3, 9
    [("10%", 7, 1), ("1%", 250, 3), ("30%", 10, 3), ("33%", 1000, 330), ("2.5%", 81, 3), ("100%", 9, 9)],
)
def test_percentages_round_up(amount, length, expected):
    assert resolve_count(amount, length) == expected
    assert len(select_indices(length, f"first:{amount}")) == expected


def test_random_is_seeded_and_a_subset_without_repeats():
    a = select_indices(100, "random:20", seed=1, position=0)
    assert a.tolist() == select_indices(100, "random:20", seed=1, position=0).tolist()
    assert len(set(a.tolist())) == 20 and min(a) >= 0 and max(a) < 100
    assert a.tolist() != select_indices(100, "random:20", seed=2, position=0).tolist()
    assert a.tolist() != select_indices(100, "random:20", seed=1, position=1).tolist()
    assert a.tolist() != list(range(20))


@pytest.mark.parametrize("bad", ["sometimes:3", "first", "first:x", "first:-2", "all:3", "", "random:%", "end:0", "end:00%"])
def test_bad_strategies_raise(bad):
    with pytest.raises(MixtureError):
        select_indices(10, bad)


def test_load_mixture_from_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths are relative to the working directory
    write_records(str(tmp_path / "a.json"), [{"id": f"a{i}", "conversations": []} for i in range(10)])
    (tmp_path / "sub").mkdir()
    write_records(str(tmp_path / "sub" / "b.jsonl"), [{"id": f"b{i}", "conversations": []} for i in range(8)])
    (tmp_path / "mix.yaml").write_text(
        "datasets:\n"
        "  - json_path: a.json\n    sampling_strategy: end:20%\n"
        "  - json_path: sub/b.jsonl\n    sampling_strategy: random:50%\n    image_folder: imgs\n"
        "  - json_path: a.json\n"
    )
    with pytest.raises(MixtureError, match=r"mix.yaml: dataset 1 \(.*b.jsonl\): image_folder .*imgs: no such directory"):
        load_mixture(str(tmp_path / "mix.yaml"), seed=3)
    (tmp_path / "imgs").mkdir()
    mix = load_mixture(str(tmp_path / "mix.yaml"), seed=3)
    ids = [mix[i]["id"] for i in range(len(mix))]
    assert len(mix) == 2 + 4 + 10
    assert ids[:2] == ["a8", "a9"] and ids[6:] == [f"a{i}" for i in range(10)]
    assert len(set(ids[2:6])) == 4 and all(i.startswith("b") for i in ids[2:6])
    assert mix[2]["_image_folder"] == str(tmp_path / "imgs")
    again = load_mixture(str(tmp_path / "mix.yaml"), seed=3)
    assert [again[i]["id"] for i in range(len(again))] == ids


def test_bad_mixture_files(tmp_path):
    (tmp_path / "m.yaml").write_text("data: []\n")
    with pytest.raises(MixtureError, match="datasets"):
        load_mixture(str(tmp_path / "m.yaml"))
    (tmp_path / "n.yaml").write_text("datasets:\n  - sampling_strategy: all\n")
    with pytest.raises(MixtureError, match="json_path"):
        load_mixture(str(tmp_path / "n.yaml"))
    (tmp_path / "s.yaml").write_text("datasets:\n  - json_path: a.json\n  - json_path: b.json\n    sampling_strategy: weight:0.5\n")
    with pytest.raises(MixtureError, match=r"s.yaml: dataset 1 \(b.json\): unknown sampling strategy 'weight:0.5'"):
        load_mixture(str(tmp_path / "s.yaml"))
    (tmp_path / "latin1.yaml").write_bytes("datasets:\n  - json_path: caf\u00e9.json\n".encode("latin-1"))
    with pytest.raises(MixtureError, match=r"latin1.yaml: not UTF-8 text \(byte 28\)"):
        load_mixture(str(tmp_path / "latin1.yaml"))


# ---- record-for-record parity with the original's LazySupervisedDataset (manager_jax/reference/llava_mixture.py)

FILES = {"data/a.json": 10, "data/b.jsonl": 250, "data/c.json": 7, "data/empty.json": 0, "data/one.jsonl": 1}


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """Record files under data/, the YAML under cfg/, the working directory at the root: json_path
    is relative to the working directory, as the original opens it."""
    for name, n in FILES.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        stem = name.split("/")[1].split(".")[0]
        write_records(str(tmp_path / name), [{"id": f"{stem}{i}", "conversations": []} for i in range(n)])
    (tmp_path / "cfg").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_mixture(path, entries):
    lines = ["datasets:"]
    for json_path, strategy in entries:
        lines.append(f"  - json_path: {json_path}")
        if strategy is not None:
            lines.append(f'    sampling_strategy: "{strategy}"')
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize(
    "strategy",
    [None, "all", "first:3", "first:0", "first:1000", "end:4", "end:1000", "first:1%", "first:10%", "end:33%",
     "first:100%", "end:150%", "first:0%", "end:1%", "first: 5", "random:0", "random:0%"],
)
def test_deterministic_strategies_select_what_the_original_selects(data_dir, strategy):
    from manager_jax.reference import llava_mixture as original

    path = write_mixture(data_dir / "cfg" / "mix.yaml", [(name, strategy) for name in FILES])
    expected = [r["id"] for r in original.load_mixture(path)]
    mix = load_mixture(path)
    assert [mix[i]["id"] for i in range(len(mix))] == expected


@pytest.mark.parametrize("strategy", ["random:3", "random:1000", "random:10%", "random:100%"])
def test_random_keeps_as_many_records_as_the_original_without_repeats(data_dir, strategy):
    """The original's shuffle is unseeded: only the count and the source of each record can match."""
    from manager_jax.reference import llava_mixture as original

    path = write_mixture(data_dir / "cfg" / "mix.yaml", [(name, strategy) for name in FILES])
    expected = [r["id"] for r in original.load_mixture(path)]
    mix = load_mixture(path, seed=7)
    got = [mix[i]["id"] for i in range(len(mix))]
    assert len(got) == len(expected) and len(set(got)) == len(got)
    strip = lambda ids: [i.rstrip("0123456789") for i in ids]  # noqa: E731 - which file each record came from
    assert strip(got) == strip(expected)
    assert got == [load_mixture(path, seed=7)[i]["id"] for i in range(len(mix))]  # reproducible


def test_json_path_is_relative_to_the_working_directory_and_expands_home(data_dir, monkeypatch):
    (data_dir / "cfg" / "data").mkdir()
    write_records(str(data_dir / "cfg" / "data" / "a.json"), [{"id": "decoy", "conversations": []}])
    monkeypatch.setenv("HOME", str(data_dir))
    path = write_mixture(data_dir / "cfg" / "mix.yaml", [("data/a.json", "first:2"), ("~/data/c.json", "end:1")])
    mix = load_mixture(path)
    assert [mix[i]["id"] for i in range(len(mix))] == ["a0", "a1", "c6"]


@pytest.mark.parametrize(
    "entry, message",
    [
        ("- sampling_strategy: all", r"dataset 1 needs a 'json_path' string"),
        ("- json_path: 3", r"dataset 1 needs a 'json_path' string"),
        ("- json_path: data/none.json", r"dataset 1 \(data/none.json\): .*not found"),
        ("- json_path: data/a.txt", r"dataset 1 \(data/a.txt\): .*\.json or \.jsonl"),
        ("- json_path: data/bad.json", r"dataset 1 \(data/bad.json\): .*not valid JSON"),
        ("- json_path: data/dict.json", r"dataset 1 \(data/dict.json\): .*expected a JSON array"),
        ("- {json_path: data/a.json, sampling_stratgy: 'first:1'}", r"dataset 1 \(data/a.json\): unknown key 'sampling_stratgy'"),
        ("- {json_path: data/a.json, sampling_strategy: 'end:0'}", r"dataset 1 \(data/a.json\): 'end:0' .*every record"),
        ("- {json_path: data/a.json, sampling_strategy: 'end:0%'}", r"dataset 1 \(data/a.json\): 'end:0%' .*every record"),
        ("- {json_path: data/a.json, sampling_strategy: 'first :3'}", r"dataset 1 \(data/a.json\): unknown sampling strategy"),
        ("- {json_path: data/a.json, sampling_strategy: null}", r"dataset 1 \(data/a.json\): sampling_strategy must be"),
        ("- {json_path: data/a.json, sampling_strategy: 5}", r"dataset 1 \(data/a.json\): sampling_strategy must be"),
        ("- {json_path: data/a.json, sampling_strategy: 'first:1:2'}", r"dataset 1 \(data/a.json\): bad sample count"),
        ("- {json_path: data/a.json, sampling_strategy: random}", r"dataset 1 \(data/a.json\): 'random' needs a count"),
    ],
)
def test_a_bad_entry_is_an_error_naming_the_yaml_and_the_entry(data_dir, entry, message):
    (data_dir / "data" / "a.txt").write_text("[]")
    (data_dir / "data" / "bad.json").write_text("[{")
    (data_dir / "data" / "dict.json").write_text("{}")
    (data_dir / "cfg" / "mix.yaml").write_text(f"datasets:\n  - json_path: data/c.json\n  {entry}\n")
    with pytest.raises(MixtureError, match=r"mix.yaml: " + message):
        load_mixture("cfg/mix.yaml")


def test_bad_entries_stop_train_and_prepare_data_with_status_2(data_dir, capsys):
    import run
    from tools import prepare_data

    path = write_mixture(data_dir / "cfg" / "mix.yaml", [("data/a.json", "all"), ("data/gone.json", "first:2")])
    assert prepare_data.main(["--data", path, "--out", "ar"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mix.yaml: dataset 1 (data/gone.json)" in err and not os.path.exists("ar")
    assert run.main(["train", "--set", "synthetic_records=None", "--set", "output_dir=run",
                     "--set", f"data.mixture={path}"]) == 2
    err = capsys.readouterr().err
    assert "mix.yaml: dataset 1 (data/gone.json)" in err and "Traceback" not in err and not os.path.exists("run")


def test_a_mixture_given_as_data_path_says_where_it_goes(data_dir, capsys):
    import run

    path = write_mixture(data_dir / "cfg" / "mix.yaml", [("data/a.json", "all")])
    assert run.main(["train", "--set", "synthetic_records=None", "--set", "output_dir=run",
                     "--set", f"data.data_path={path}"]) == 2
    assert f"data.data_path: {path} is a mixture YAML: give it as data.mixture" in capsys.readouterr().err
