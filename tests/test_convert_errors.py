"""Corrupt or inconsistent inputs: one clear message listing every problem, and nothing written."""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import pytest
import torch

from manager_jax.config import tiny
from tools.convert_weights import convert, testing
from tools.convert_weights.sources import ConversionError, ConversionFailed


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A valid sharded grid+manager checkpoint in the original layout, and its params directory."""
    root = tmp_path_factory.mktemp("good")
    testing.write_original_checkpoint(str(root / "ckpt"), tiny("grid_manager"), num_shards=3)
    convert.to_orbax(str(root / "ckpt"), str(root / "params"))
    return root


def _copy(good, tmp_path) -> str:
    dst = tmp_path / "ckpt"
    shutil.copytree(good / "ckpt", dst)
    return str(dst)


def _assert_nothing_written(tmp_path, name="out"):
    assert not os.path.exists(tmp_path / name)
    leftovers = [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    assert leftovers == []


def _convert_fails(src, tmp_path) -> str:
    with pytest.raises(ConversionError) as err:
        convert.to_orbax(src, str(tmp_path / "out"))
    _assert_nothing_written(tmp_path)
    return str(err.value)


def _shard(src, k):
    return os.path.join(src, f"model-0000{k}-of-00003.safetensors")


def test_truncated_shard(good, tmp_path):
    src = _copy(good, tmp_path)
    size = os.path.getsize(_shard(src, 2))
    with open(_shard(src, 2), "r+b") as f:
        f.truncate(size - 1000)
    msg = _convert_fails(src, tmp_path)
    assert "model-00002-of-00003.safetensors" in msg and "truncated" in msg


def test_missing_shard_and_truncated_shard_reported_together(good, tmp_path):
    src = _copy(good, tmp_path)
    os.remove(_shard(src, 3))
    with open(_shard(src, 1), "r+b") as f:
        f.truncate(os.path.getsize(_shard(src, 1)) // 2)
    msg = _convert_fails(src, tmp_path)
    assert "2 problems" in msg
    assert "missing: model-00003-of-00003.safetensors" in msg
    assert "model-00001-of-00003.safetensors: truncated" in msg


def test_config_disagreeing_with_tensors_lists_every_problem(good, tmp_path):
    src = _copy(good, tmp_path)
    config = pathlib.Path(src, "config.json")
    cfg = json.loads(config.read_text())
    cfg.update(num_hidden_layers=5, vocab_size=600, mm_manager_injection_interval=1, mm_patch_merge_type="flat")
    config.write_text(json.dumps(cfg))
    msg = _convert_fails(src, tmp_path)
    assert "num_hidden_layers=5 but the checkpoint has decoder layers 0..3 (4)" in msg
    assert "vocab_size=600 but model.embed_tokens.weight has 512 rows" in msg
    assert "injection layers [0, 1, 2, 3] need 4 managers" in msg
    assert "mm_manager_index_list [0, 2] disagrees" in msg
    assert "has no image_newline but the checkpoint has model.image_newline" in msg
    assert "model.layers.{4}.self_attn.q_proj.weight" in msg  # grouped missing keys
    assert "model.manager.{2..3}.layer_scores" in msg


def test_manager_tensors_without_manager_config(good, tmp_path):
    src = _copy(good, tmp_path)
    config = pathlib.Path(src, "config.json")
    cfg = json.loads(config.read_text())
    for key in [k for k in cfg if k.startswith("mm_manager")]:
        del cfg[key]
    cfg["model_type"] = "llava_qwen"
    config.write_text(json.dumps(cfg))
    msg = _convert_fails(src, tmp_path)
    assert "Manager tensors" in msg and "unexpected tensors" in msg


def test_shape_and_dtype_problems(tmp_path):
    cfg = tiny("baseline")
    tensors, _, _ = testing.write_original_checkpoint(str(tmp_path / "ckpt"), cfg)
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(100, 64)
    tensors["model.norm.weight"] = torch.zeros(64, dtype=torch.int32)
    tensors["model.layers.2.mlp.gate_proj.weight"] = tensors["model.layers.2.mlp.gate_proj.weight"].half()
    tensors["extra.thing"] = torch.zeros(3)
    os.remove(tmp_path / "ckpt" / "model.safetensors")
    testing.save_sharded(str(tmp_path / "ckpt"), tensors)
    msg = _convert_fails(str(tmp_path / "ckpt"), tmp_path)
    assert "model.layers.1.mlp.up_proj.weight: [100, 64] in the checkpoint, the config implies [128, 64]" in msg
    assert "model.norm.weight: dtype I32" in msg
    assert "unexpected tensors:\n    extra.thing" in msg
    # Mixed dtypes inside a stacked parameter only matter with --dtype keep; they are caught before
    # anything is written, after the structural problems above are fixed.
    del tensors["extra.thing"]
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(128, 64)
    tensors["model.norm.weight"] = torch.zeros(64)
    testing.save_sharded(str(tmp_path / "ckpt"), tensors)
    msg = _convert_fails(str(tmp_path / "ckpt"), tmp_path)
    assert "text.layers.mlp.gate.kernel: its layers are stored in different dtypes (F16, F32)" in msg
    convert.to_orbax(str(tmp_path / "ckpt"), str(tmp_path / "out"), dtype="fp32")  # resolved by a dtype


def test_existing_destination_is_kept(good, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="already exists"):
        convert.to_orbax(str(good / "ckpt"), str(tmp_path / "out"))
    with pytest.raises(ConversionError, match="already exists"):
        convert.from_orbax(str(good / "params"), str(tmp_path / "out"), fmt="llava")
    assert os.listdir(tmp_path / "out") == ["keep.txt"]
    convert.from_orbax(str(good / "params"), str(tmp_path / "out"), fmt="llava", overwrite=True)
    assert "keep.txt" not in os.listdir(tmp_path / "out") and "config.json" in os.listdir(tmp_path / "out")


def test_unknown_formats_are_named(tmp_path):
    with pytest.raises(ConversionError, match="does not exist"):
        convert.to_orbax(str(tmp_path / "nothing"), str(tmp_path / "out"))
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(ConversionError, match="siglip\\+qwen2"):
        convert.to_orbax(str(tmp_path / "x"), str(tmp_path / "out"))
    _assert_nothing_written(tmp_path)


def test_orbax_params_disagreeing_with_their_config(good, tmp_path):
    shutil.copytree(good / "params", tmp_path / "params")
    cfg = json.loads((tmp_path / "params" / "config.json").read_text())
    cfg["text"]["num_layers"] = 6
    (tmp_path / "params" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError) as err:
        convert.from_orbax(str(tmp_path / "params"), str(tmp_path / "out"), fmt="llava")
    assert "text.layers.attn.q.kernel has shape [4, 64, 64], expected [6, 64, 64]" in str(err.value)
    _assert_nothing_written(tmp_path)


def test_a_damaged_orbax_source_is_bad_input(good, tmp_path):
    """Array bytes cut short after the metadata was read (a large checkpoint's array file, a copy
    interrupted): one error naming the parameter, of the conversion's bad-input class (exit 2, as
    `run.py generate` on the same checkpoint; it was a ConversionFailed, exit 1). A cut that breaks
    the metadata itself is refused as bad input before any array is read."""
    from tools.convert_weights.orbax_io import OrbaxSource

    shutil.copytree(good / "params", tmp_path / "params")
    source = OrbaxSource(str(tmp_path / "params"))  # metadata and config read while intact
    (data,) = [os.path.join(d, n) for d, _, names in os.walk(tmp_path / "params" / "params" / "d") for n in names]
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)
    with pytest.raises(ConversionError) as err:
        source.read(("text", "embed", "embedding"))
    assert not isinstance(err.value, ConversionFailed)
    assert "parameter text.embed.embedding (damaged or unreadable)" in str(err.value), err.value
    with pytest.raises(ConversionError) as err:
        convert.from_orbax(str(tmp_path / "params"), str(tmp_path / "out"), fmt="llava")
    assert not isinstance(err.value, ConversionFailed) and "damaged or unreadable" in str(err.value)
    _assert_nothing_written(tmp_path)


def test_failure_while_writing_leaves_nothing(good, tmp_path, monkeypatch):
    """An I/O failure mid-export (here: a tensor that cannot be read) is one error naming its cause,
    and the temporary directory is removed."""
    from tools.convert_weights import orbax_io

    calls = {"n": 0}
    real_read = orbax_io.OrbaxSource.read

    def flaky(self, path, layer=None):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError("disk went away")
        return real_read(self, path, layer)

    monkeypatch.setattr(orbax_io.OrbaxSource, "read", flaky)
    with pytest.raises(ConversionFailed, match=r"reading or writing failed \(OSError: disk went away\)"):
        convert.from_orbax(str(good / "params"), str(tmp_path / "out"), fmt="llava")
    _assert_nothing_written(tmp_path)


def test_tied_config_with_a_different_stored_lm_head_is_refused(tmp_path, capsys):
    """transformers keeps a stored lm_head that differs from the embedding even under a tied config
    (it unties them); dropping it as "tied" would convert another model than the one transformers runs."""
    from safetensors.torch import load_file, save_file

    from manager_jax.reference.hf_tiny import tiny_hf_config, tiny_hf_model
    from tools.convert_weights.cli import main

    src = tmp_path / "src"
    tiny_hf_model(tiny_hf_config(vision_layers=2, text_layers=2, tie_word_embeddings=False), seed=1).save_pretrained(src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["tie_word_embeddings"] = cfg["text_config"]["tie_word_embeddings"] = True
    (src / "config.json").write_text(json.dumps(cfg))
    code = main(["to-orbax", str(src), str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "tie_word_embeddings" in err and "language_model.lm_head.weight differs" in err, err
    _assert_nothing_written(tmp_path)
    # A stored copy of the embedding is what a tied model may hold: still dropped, not refused.
    tensors = load_file(src / "model.safetensors")
    tensors["language_model.lm_head.weight"] = tensors["language_model.model.embed_tokens.weight"].clone()
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    assert main(["to-orbax", str(src), str(tmp_path / "out"), "--quiet"]) == 0


def test_weights_holding_nan_or_inf_are_converted_with_a_warning_naming_them(tmp_path, caplog):
    """A NaN in a checkpoint converted without a word: the tensors that hold NaN or inf are named in a
    warning (the values are copied as they are: a conversion does not edit weights)."""
    import torch
    from safetensors.torch import load_file, save_file

    from manager_jax.reference.hf_tiny import tiny_hf_config, tiny_hf_model

    src = tmp_path / "src"
    tiny_hf_model(tiny_hf_config(vision_layers=2, text_layers=2), seed=1).save_pretrained(src)
    tensors = load_file(src / "model.safetensors")
    poisoned = sorted(k for k in tensors if k.endswith("layers.1.mlp.down_proj.weight"))[0]
    tensors[poisoned][0, 0] = torch.nan
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level("WARNING", logger="tools.convert_weights.convert"):
        convert.to_orbax(str(src), str(tmp_path / "out"))
    assert f"1 tensors of {src} hold NaN or inf values, converted as they are: {poisoned}" in caplog.text
    caplog.clear()
    tensors[poisoned][0, 0] = 0.0
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level("WARNING", logger="tools.convert_weights.convert"):
        convert.to_orbax(str(src), str(tmp_path / "out2"))
    assert "NaN" not in caplog.text
