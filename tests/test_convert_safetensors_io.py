"""Our streaming safetensors reader/writer against the official `safetensors` package."""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tools.convert_weights.safetensors_io import (
    INDEX_FILE,
    SafetensorsCheckpoint,
    SafetensorsError,
    TensorPlan,
    read_header,
    write_checkpoint,
)


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "b.bias": torch.randn(3, generator=g),
        "c.half": torch.randn(2, 3, 4, generator=g).to(torch.float16),
        "d.empty": torch.zeros(0, 4),
    }


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.uint8).numpy()


def test_reader_matches_official_writer_bit_for_bit(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ckpt = SafetensorsCheckpoint(str(tmp_path))
    assert set(ckpt.keys()) == set(tensors)
    for name, t in tensors.items():
        got = np.asarray(ckpt.read(name))
        assert got.shape == tuple(t.shape)
        assert np.array_equal(got.reshape(-1).view(np.uint8), _bits(t).reshape(-1))
    assert ckpt.info("a.weight").numpy_dtype == np.dtype(ml_dtypes.bfloat16)


def test_writer_output_reads_with_official_reader(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {
        "x": rng.standard_normal((4, 6)).astype(ml_dtypes.bfloat16),
        "y": rng.standard_normal(5).astype(np.float32),
        "z": rng.standard_normal((3, 3)).astype(np.float16),
    }
    produced = []

    def producer(name):
        def produce():
            produced.append(name)  # lazily, one at a time, in plan order
            return arrays[name]
        return produce

    plans = [TensorPlan(k, v.shape, v.dtype, producer(k)) for k, v in arrays.items()]
    files = write_checkpoint(str(tmp_path), plans, max_shard_bytes=60)
    assert len(files) > 1 and os.path.exists(tmp_path / INDEX_FILE)
    assert produced == list(arrays)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(arrays)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in arrays.values())
    for name, file in index["weight_map"].items():
        with safe_open(str(tmp_path / file), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            t = f.get_tensor(name)
        assert np.array_equal(_bits(t).reshape(-1), np.ascontiguousarray(arrays[name]).reshape(-1).view(np.uint8))


def test_single_file_when_under_the_shard_limit(tmp_path):
    a = np.arange(6, dtype=np.float32)
    files = write_checkpoint(str(tmp_path), [TensorPlan("a", a.shape, a.dtype, lambda: a)])
    assert files == ["model.safetensors"] and not os.path.exists(tmp_path / INDEX_FILE)


def test_truncated_file_is_reported(tmp_path):
    save_file(_tensors(), tmp_path / "model.safetensors")
    path = tmp_path / "model.safetensors"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 3)
    with pytest.raises(SafetensorsError, match="truncated"):
        read_header(str(path))
    with open(path, "r+b") as f:
        f.truncate(20)  # inside the header
    with pytest.raises(SafetensorsError, match="truncated"):
        read_header(str(path))


def test_inconsistent_header_is_reported(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}
    raw = json.dumps(header).encode()
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 12)
    with pytest.raises(SafetensorsError, match="needs 16"):
        read_header(str(tmp_path / "bad.safetensors"))


def test_missing_shard_and_index_disagreement(tmp_path):
    t = _tensors()
    save_file({"a.weight": t["a.weight"]}, tmp_path / "s1.safetensors")
    save_file({"b.bias": t["b.bias"]}, tmp_path / "s2.safetensors")
    index = {"weight_map": {"a.weight": "s1.safetensors", "b.bias": "s3.safetensors", "c.half": "s2.safetensors"}}
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(SafetensorsError) as err:
        SafetensorsCheckpoint(str(tmp_path))
    msg = str(err.value)
    assert "s3.safetensors" in msg and "missing" in msg
    assert "c.half" in msg  # listed in s2 but not in it
    assert "b.bias" in msg  # in s2 but the index says s3


def test_a_single_file_beside_an_index_is_what_is_read(tmp_path, caplog):
    """model.safetensors and an index in one folder: transformers' from_pretrained loads the single
    file (it looks for it first), so the conversion reads it too, with a warning (the index's shards,
    other weights, were read without a word)."""
    t = _tensors()
    save_file(t, tmp_path / "model.safetensors")
    save_file({k: v * 2 for k, v in t.items()}, tmp_path / "model-00001-of-00001.safetensors")
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {k: "model-00001-of-00001.safetensors" for k in t}}))
    with caplog.at_level("WARNING"):
        ckpt = SafetensorsCheckpoint(str(tmp_path))
    assert [os.path.basename(f) for f in ckpt.files] == ["model.safetensors"]
    assert np.array_equal(ckpt.read("b.bias"), t["b.bias"].numpy())
    assert "holds both model.safetensors and model.safetensors.index.json: reading model.safetensors" in caplog.text
