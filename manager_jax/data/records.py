"""LLaVA records from JSON / JSONL files, as random-access sources (SPEC §5).

A record is ``{"id", "image": path | [paths] (optional), "conversations": [{"from", "value"}]}``.
Image paths stay relative here; :mod:`manager_jax.data.samples` resolves them against the image
folder. Every source has ``len()`` and ``source[i] -> dict``, which is what Grain's
``MapDataset.source`` needs, and pickles cheaply for worker processes.

- :class:`JsonRecords`: a JSON array, loaded once (as the original does).
- :class:`JsonlRecords`: JSON Lines, indexed by byte offset in one streaming pass, each line
  read with ``os.pread`` (no shared file position, so Grain's read threads can share it) and
  parsed on access, so a large file never sits in memory.
- :func:`iter_jsonl`: plain streaming iteration.
- ``data_path`` may also be the original's brace form ``dir/{a,b}.json`` (several files).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np


class RecordFormatError(ValueError):
    """A data file that cannot be read as LLaVA records."""


class RecordSource(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict: ...


def _check_index(index: int, length: int) -> int:
    index = int(index)
    if index < 0:
        index += length
    if not 0 <= index < length:
        raise IndexError(f"record index {index} out of range for {length} records")
    return index


def _json_type(value: Any) -> str:
    """A JSON value's type by JSON's names (null, not NoneType)."""
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "an array"}
    return names.get(type(value), type(value).__name__)


class JsonRecords:
    """A JSON file holding an array of records."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            # utf-8-sig: files saved by Windows tools start with a BOM (JSONL lines accept it too).
            with open(path, encoding="utf-8-sig") as f:
                data = json.load(f)
        except json.JSONDecodeError as err:
            raise RecordFormatError(f"{path}: not valid JSON ({err})") from None
        except UnicodeDecodeError as err:
            raise RecordFormatError(f"{path}: not UTF-8 text (byte {err.start}: {err.object[err.start:err.start + 1]!r}); "
                                    "re-encode it as UTF-8") from None
        if not isinstance(data, list):
            raise RecordFormatError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
        self._records = data

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        record = self._records[_check_index(index, len(self))]
        if not isinstance(record, dict):
            # As a JSONL line that is no object: a record the sample step skips and counts. A None
            # reached Grain as it is, which drops it uncounted (a file of nulls trained for ever).
            return {"id": f"{os.path.basename(self.path)}[{index}]",
                    "_error": f"a record must be a JSON object, got {_json_type(record)}"}
        return record

    def __repr__(self) -> str:
        return f"JsonRecords({self.path!r}, n={len(self)})"


class JsonlRecords:
    """A JSON Lines file, one record per non-blank line, read lazily through a byte-offset index.

    A line that is not valid JSON is returned as ``{"_error": message, "id": "<file>:<line>"}`` so
    that the sample step skips it with a reason instead of stopping the run.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        offsets, sizes, lines = [], [], []
        with open(path, "rb") as f:
            position = 0
            for number, line in enumerate(f, start=1):
                if line.strip():
                    offsets.append(position)
                    sizes.append(len(line))
                    lines.append(number)
                position += len(line)
        self._offsets = np.asarray(offsets, np.int64)
        self._sizes = np.asarray(sizes, np.int64)
        self._line_numbers = np.asarray(lines, np.int64)
        self._fd: int | None = None

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> dict:
        index = _check_index(index, len(self))
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)  # kept open for fast random access
        # pread takes the offset itself: a seek + readline on one shared handle lets concurrent
        # read threads receive each other's lines.
        line = os.pread(self._fd, int(self._sizes[index]), int(self._offsets[index]))
        where = f"{os.path.basename(self.path)}:{int(self._line_numbers[index])}"
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return {"id": where, "_error": f"invalid JSON line: {err}"}
        if not isinstance(record, dict):  # valid JSON but no record: named by its line, like a broken one
            return {"id": where, "_error": f"a JSON line must be an object (a record), got {_json_type(record)}"}
        return record

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fd"] = None  # file descriptors do not cross into worker processes
        return state

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def __repr__(self) -> str:
        return f"JsonlRecords({self.path!r}, n={len(self)})"


def iter_jsonl(path: str) -> Iterator[dict]:
    """Stream the records of a JSON Lines file (blank lines ignored)."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as err:
                raise RecordFormatError(f"{path}:{number}: invalid JSON ({err})") from None


class ConcatRecords:
    """Several sources one after another."""

    def __init__(self, sources: Sequence[RecordSource]) -> None:
        self.sources = list(sources)
        self._ends = np.cumsum([len(s) for s in self.sources], dtype=np.int64)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, index: int) -> dict:
        index = _check_index(index, len(self))
        which = int(np.searchsorted(self._ends, index, side="right"))
        start = int(self._ends[which - 1]) if which else 0
        return self.sources[which][index - start]


class SubsetRecords:
    """The records of ``source`` at ``indices``, in that order; optionally tagged with an image folder."""

    def __init__(self, source: RecordSource, indices: Sequence[int] | None = None, image_folder: str | None = None) -> None:
        self.source = source
        self.indices = np.arange(len(source), dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
        self.image_folder = image_folder

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        record = self.source[int(self.indices[_check_index(index, len(self))])]
        if self.image_folder is not None and isinstance(record, Mapping):
            record = {**record, "_image_folder": self.image_folder}
        return record


_BRACE = re.compile(r"^(.*)\{(.*)\}(\.jsonl?)$")


def expand_data_path(path: str) -> list[str]:
    """``dir/{a,b}.json`` -> [``dir/a.json``, ``dir/b.json``] (train.py L981-992); else [path]."""
    match = _BRACE.match(path)
    if match is None:
        return [path]
    base, names, suffix = match.groups()
    return [f"{base}{name.strip()}{suffix}" for name in names.split(",") if name.strip()]


def open_records(path: str, fmt: str = "auto") -> RecordSource:
    """A random-access source for a JSON / JSONL file (or a brace pattern of several)."""
    paths = expand_data_path(path)
    sources = []
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"data file not found: {p!r}")
        kind = fmt
        if kind == "auto":
            kind = "jsonl" if p.endswith(".jsonl") else "json" if p.endswith(".json") else None
            if kind is None:
                raise RecordFormatError(f"cannot tell the format of {p!r} from its suffix: name it .json or .jsonl (training "
                                        "also takes --set data.format=json or jsonl)")
        if kind == "json":
            sources.append(JsonRecords(p))
        elif kind == "jsonl":
            sources.append(JsonlRecords(p))
        else:
            raise RecordFormatError(f"unsupported record format {fmt!r} (json | jsonl)")
    return sources[0] if len(sources) == 1 else ConcatRecords(sources)


def json_text(value: Any, **dumps_options: Any) -> str:
    """`value` as JSON text for a UTF-8 file; \\u escapes for a string UTF-8 cannot hold (a lone
    surrogate, as a cut-off emoji leaves in scraped text), which `json.loads` reads back as it was."""
    text = json.dumps(value, ensure_ascii=False, **dumps_options)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, **dumps_options)
    return text


def write_records(path: str, records: Sequence[Mapping[str, Any]]) -> None:
    """Write records as a JSON array (``.json``) or JSON Lines (``.jsonl``)."""
    with open(path, "w", encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            for r in records:
                f.write(json_text(r) + "\n")
        else:
            f.write(json_text(list(records), indent=1))
