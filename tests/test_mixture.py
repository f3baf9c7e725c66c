"""YAML mixtures: all / first:K / end:K / random:K, K as a count or P%, seeded random."""

import pytest

from manager_jax.data.mixture import MixtureError, load_mixture, resolve_count, select_indices
from manager_jax.data.records import write_records


def test_strategies_select_the_right_indices():
    assert select_indices(10, "all").tolist() == list(range(10))
    assert select_indices(10, "first:3").tolist() == [0, 1, 2]
    assert select_indices(10, "end:3").tolist() == [7, 8, 9]
    assert select_indices(10, "first:30").tolist() == list(range(10))  # more than there is
    assert select_indices(10, "end:0").tolist() == []


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


@pytest.mark.parametrize("bad", ["sometimes:3", "first", "first:x", "first:-2", "all:3", "", "random:%"])
def test_bad_strategies_raise(bad):
    with pytest.raises(MixtureError):
        select_indices(10, bad)


def test_load_mixture_from_yaml(tmp_path):
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
