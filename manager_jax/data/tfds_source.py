"""LLaVA records with their image bytes inside ArrayRecord files, in a TFDS-compatible layout.

Layout of a converted dataset folder (written by ``tools/prepare_data.py``)::

    <dir>/
      dataset_info.json, features.json           TFDS metadata (tfds.builder_from_directory reads it)
      llava-<split>.array_record-00000-of-0000N  ArrayRecord shards; each record is a serialized
                                                 tf.train.Example with the features below
      llava_records.json                         our index: format version, splits, record
                                                 counts, shard names, conversion skips

Features (``tfds.features.FeaturesDict``):

- ``id``: Text, the record id.
- ``record_json``: Text, the whole LLaVA record as JSON (``conversations``, ``image`` names and
  any other field), without image bytes.
- ``image_bytes``: Sequence of scalar bytes, the encoded files (JPEG/PNG/...) in the order of
  ``image``; empty for text-only records.

Images stay encoded, so the pipeline decodes them with the same code and the same bad-input
handling as images read from a folder. Reading needs no TensorFlow:
:class:`ArrayRecordRecords` parses the examples with TFDS' numpy parser, and
``tfds.builder_from_directory(dir).as_data_source(split)`` works as well.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from manager_jax.data.records import RecordFormatError, json_text

FORMAT_NAME = "manager_jax.llava_arrayrecord"
FORMAT_VERSION = 1
INDEX_FILE = "llava_records.json"
DATASET_NAME = "llava"
FILENAME_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"


@functools.lru_cache(maxsize=1)
def features():
    """The TFDS FeaturesDict of one record (imported lazily: tensorflow_datasets is heavy)."""
    import numpy as np
    import tensorflow_datasets as tfds

    return tfds.features.FeaturesDict(
        {
            "id": tfds.features.Text(),
            "record_json": tfds.features.Text(),
            "image_bytes": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
        }
    )


def shard_name(split: str, shard: int, num_shards: int) -> str:
    return f"{DATASET_NAME}-{split}.array_record-{shard:05d}-of-{num_shards:05d}"


def serialize_record(record: Mapping[str, Any], image_bytes: Iterable[bytes]) -> bytes:
    """One record (without bytes) plus its encoded images -> a serialized tf.train.Example."""
    from tensorflow_datasets.core import example_serializer

    feats = features()
    clean = {k: v for k, v in record.items() if k not in ("image_bytes", "_image_folder")}
    example = feats.encode_example(
        {
            "id": str(clean.get("id", "")),
            "record_json": json_text(clean),
            "image_bytes": [bytes(b) for b in image_bytes],
        }
    )
    return example_serializer.ExampleSerializer(feats.get_serialized_info()).serialize_example(example)


@functools.lru_cache(maxsize=1)
def _parser():
    from tensorflow_datasets.core import example_parser

    return example_parser.ExampleParserNp(features().get_serialized_info())


def parse_record(data: bytes) -> dict:
    """A serialized example -> the LLaVA record dict with ``image_bytes`` (list of bytes)."""
    parsed = _parser().parse_example(data)
    record = json.loads(parsed["record_json"].decode("utf-8"))
    blobs = [bytes(b) for b in parsed["image_bytes"]]
    if blobs or record.get("image") is not None:  # a text-only record stays one (its "<image>" is text)
        record["image_bytes"] = blobs
    return record


class ArrayRecordWriterSet:
    """Writes the shards of one split; record i of n goes to shard i * num_shards // n (contiguous).

    The shards are written one after the other with one file open at a time: thousands of shards
    opened at once ran into the open-file limit."""

    def __init__(self, out_dir: str, split: str, num_records: int, num_shards: int = 1) -> None:
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.split = out_dir, split
        self.num_records = max(num_records, 1)
        self.num_shards = num_shards
        self.shard_lengths = [0] * num_shards
        self.written = 0
        self._shard = -1  # the shard of `_writer`
        self._writer = None

    def _open_shard(self, shard: int) -> None:
        """Closes the open shard and creates the files up to `shard` (empty ones too: every shard
        of the index exists), leaving `shard` open."""
        from array_record.python.array_record_module import ArrayRecordWriter

        while self._shard < shard:
            self.discard()
            self._shard += 1
            # group_size:1 keeps random access to one record cheap (the Grain recommendation).
            self._writer = ArrayRecordWriter(os.path.join(self.out_dir, shard_name(self.split, self._shard,
                                                                                   self.num_shards)), "group_size:1")

    def write(self, data: bytes) -> None:
        shard = min(self.written * self.num_shards // self.num_records, self.num_shards - 1)
        self._open_shard(shard)
        self._writer.write(data)
        self.shard_lengths[shard] += 1
        self.written += 1

    def close(self) -> None:
        """Completes the split: the open shard closed and every later one created."""
        self._open_shard(self.num_shards - 1)
        self.discard()

    def discard(self) -> None:
        """Closes the open shard without creating the later ones (a failed conversion's end)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    @property
    def shard_files(self) -> list[str]:
        return [shard_name(self.split, s, self.num_shards) for s in range(self.num_shards)]


def write_metadata(out_dir: str, splits: Mapping[str, ArrayRecordWriterSet], extra: Mapping[str, Any] | None = None,
                   modality_lengths: Mapping[str, Sequence[int]] | None = None) -> None:
    """TFDS dataset_info.json / features.json plus our llava_records.json index (and, per split,
    the records' modality lengths as ``<split>_modality_lengths.npy``)."""
    import tensorflow_datasets as tfds

    split_infos = []
    for name, writer in splits.items():
        split_infos.append(
            tfds.core.SplitInfo(
                name=name,
                shard_lengths=list(writer.shard_lengths),
                num_bytes=sum(os.path.getsize(os.path.join(out_dir, f)) for f in writer.shard_files),
                filename_template=tfds.core.ShardedFileTemplate(
                    data_dir=out_dir, template=FILENAME_TEMPLATE, dataset_name=DATASET_NAME,
                    filetype_suffix="array_record",
                ),
            )
        )
    tfds.folder_dataset.write_metadata(
        data_dir=out_dir, features=features(), split_infos=split_infos,
        filename_template=FILENAME_TEMPLATE, check_data=False,
    )
    index = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "splits": {
            name: {"num_records": w.written, "shards": w.shard_files, "shard_lengths": list(w.shard_lengths)}
            for name, w in splits.items()
        },
        **dict(extra or {}),
    }
    for name, lengths in (modality_lengths or {}).items():
        if len(lengths) != splits[name].written:
            raise ValueError(f"{len(lengths)} modality lengths for {splits[name].written} records of split {name!r}")
        filename = f"{name}_modality_lengths.npy"
        np.save(os.path.join(out_dir, filename), np.asarray(lengths, np.int32))
        index["splits"][name]["modality_lengths"] = filename
    with open(os.path.join(out_dir, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1)


def is_arrayrecord_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, INDEX_FILE))


def read_index(data_dir: str) -> dict:
    path = os.path.join(data_dir, INDEX_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{data_dir!r} is not a converted dataset: no {INDEX_FILE} (run tools/prepare_data.py)")
    with open(path, encoding="utf-8") as f:
        index = json.load(f)
    if index.get("format") != FORMAT_NAME or int(index.get("version", -1)) > FORMAT_VERSION:
        raise RecordFormatError(f"{path}: format {index.get('format')!r} v{index.get('version')} is not {FORMAT_NAME} v<={FORMAT_VERSION}")
    return index


class ArrayRecordRecords:
    """Random-access records of one split of a converted dataset (a Grain-compatible source)."""

    def __init__(self, data_dir: str, split: str = "train") -> None:
        import grain

        index = read_index(data_dir)
        if split not in index["splits"]:
            # RecordFormatError: `run.py train` reports it as bad input (one line), not as a crash.
            raise RecordFormatError(f"{data_dir!r} has no split {split!r}; it has {sorted(index['splits'])}")
        info = index["splits"][split]
        self.data_dir, self.split = data_dir, split
        paths = [os.path.join(data_dir, s) for s, n in zip(info["shards"], info["shard_lengths"]) if n > 0]
        self._length = int(info["num_records"])
        self._source = grain.sources.ArrayRecordDataSource(paths) if paths else None
        self._lengths_file = os.path.join(data_dir, info["modality_lengths"]) if info.get("modality_lengths") else None

    def modality_lengths(self) -> np.ndarray | None:
        """The records' modality lengths stored at conversion (None for data sets converted before)."""
        return None if self._lengths_file is None else np.load(self._lengths_file)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self._length:
            raise IndexError(f"record index {index} out of range for {self._length} records")
        return parse_record(self._source[index])

    def __repr__(self) -> str:
        return f"ArrayRecordRecords({self.data_dir!r}, split={self.split!r}, n={self._length})"
