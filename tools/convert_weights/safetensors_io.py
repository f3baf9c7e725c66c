"""Streaming safetensors: header parsing with integrity checks, per-tensor memory-mapped reads,
and a sharded writer that writes each tensor as it is produced.

The reader is our own (a few lines over the documented format: u64 header length, JSON header,
raw little-endian data) rather than `safetensors.safe_open`, because the numpy backend of
`safetensors` cannot return bfloat16 tensors and the torch backend would make the converter depend
on torch. Each tensor is a `numpy.memmap` over its byte range, dropped right after use, so the
pages of a multi-GB checkpoint never all sit in memory at once. Tests read our output with the
official `safetensors` package, an independent implementation.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import ml_dtypes
import numpy as np

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# The header-size limit of the reference implementation (100 MB): anything larger is corrupt.
MAX_HEADER_BYTES = 100_000_000

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
DTYPE_NAMES: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class SafetensorsError(ValueError):
    """A safetensors file or sharded checkpoint that cannot be read as written."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype name (safetensors spelling), shape and absolute byte range."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    end: int

    @property
    def numpy_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parses and checks one file's header: tensors by name and the `__metadata__` dict.

    Raises SafetensorsError for a truncated file, a malformed header, unknown dtypes, byte ranges
    that do not match the shapes, overlap or leave holes (the rules of the reference reader).
    """
    size = os.path.getsize(path)
    name = os.path.basename(path)
    if size < 8:
        raise SafetensorsError(f"{name}: {size} bytes, too short to be a safetensors file (truncated?)")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise SafetensorsError(
                f"{name}: header claims {header_len} bytes but the file has {size} bytes (truncated or not safetensors)"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{name}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{name}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{name}: malformed header entry for {key!r}: {entry!r}") from None
        if dtype not in DTYPES:
            raise SafetensorsError(f"{name}: tensor {key!r} has unsupported dtype {dtype!r}")
        expected = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        if end - begin != expected:
            raise SafetensorsError(
                f"{name}: tensor {key!r} spans {end - begin} bytes but {dtype}{list(shape)} needs {expected}"
            )
        tensors[key] = TensorInfo(path, dtype, shape, data_start + int(begin), data_start + int(end))
    # Byte ranges must tile the data section exactly (no overlap, no hole), as the reference reader demands.
    cursor = data_start
    for key, info in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if info.start != cursor:
            raise SafetensorsError(f"{name}: tensor {key!r} starts at byte {info.start}, expected {cursor} (corrupt header)")
        cursor = info.end
    if cursor > size:
        raise SafetensorsError(
            f"{name}: truncated: the header describes {cursor} bytes of file but only {size} are present"
        )
    if cursor < size:
        raise SafetensorsError(f"{name}: {size - cursor} trailing bytes after the last tensor (corrupt file)")
    return tensors, metadata


def find_weight_files(directory: str) -> tuple[list[str], dict[str, str] | None, list[str]]:
    """The safetensors files of a checkpoint directory, the index's weight map if sharded, and the
    shards the index names that do not exist.

    A sharded checkpoint is described by `model.safetensors.index.json`. Without an index, a single
    `*.safetensors` file is expected. A `model.safetensors` beside an index is what transformers'
    `from_pretrained` loads (it looks for that file first), so it is what is read here too.
    """
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index_path) and os.path.isfile(os.path.join(directory, SINGLE_FILE)):
        logger.warning("%s holds both %s and %s: reading %s, as transformers' from_pretrained does",
                       directory, SINGLE_FILE, INDEX_FILE, SINGLE_FILE)
        return [os.path.join(directory, SINGLE_FILE)], None, []
    if os.path.exists(index_path):
        with open(index_path) as f:
            try:
                index = json.load(f)
            except json.JSONDecodeError as e:
                raise SafetensorsError(f"{INDEX_FILE}: not valid JSON ({e})") from None
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise SafetensorsError(f"{INDEX_FILE}: no weight_map")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not os.path.exists(os.path.join(directory, s))]
        present = [os.path.join(directory, s) for s in shards if s not in missing]
        return present, weight_map, missing
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        pickles = sorted(f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth")))
        hint = (f" (found {', '.join(pickles)}: PyTorch pickle files are not read, being neither safe to load nor "
                "memory-mappable; save them as safetensors first)") if pickles else ""
        raise SafetensorsError(f"no *.safetensors file and no {INDEX_FILE} in {directory}{hint}")
    if len(files) > 1 and SINGLE_FILE not in files:
        raise SafetensorsError(f"{len(files)} safetensors files but no {INDEX_FILE}: {', '.join(files)}")
    return [os.path.join(directory, SINGLE_FILE if SINGLE_FILE in files else files[0])], None, []


class SafetensorsCheckpoint:
    """All tensors of a single-file or sharded safetensors checkpoint, read lazily one at a time."""

    def __init__(self, path: str):
        self.path = path
        self.directory = path if os.path.isdir(path) else os.path.dirname(path)
        if os.path.isdir(path):
            files, weight_map, missing = find_weight_files(path)
        else:
            files, weight_map, missing = [path], None, []
        self.files = files
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, dict[str, str]] = {}
        problems = []
        if missing:
            problems.append(f"{INDEX_FILE} names {len(set(weight_map.values()))} shards but {len(missing)} "
                            f"{'is' if len(missing) == 1 else 'are'} missing: {', '.join(missing)}")
        for file in files:
            try:
                tensors, metadata = read_header(file)
            except SafetensorsError as e:
                problems.append(str(e))
                continue
            self.metadata[os.path.basename(file)] = metadata
            for key, info in tensors.items():
                if key in self.tensors:
                    problems.append(f"tensor {key!r} appears in both {os.path.basename(self.tensors[key].file)} "
                                    f"and {os.path.basename(file)}")
                self.tensors[key] = info
        unreadable = set(missing) | {os.path.basename(f) for f in files
                                     if os.path.basename(f) not in self.metadata}
        if weight_map is not None:
            for key, shard in weight_map.items():
                info = self.tensors.get(key)
                if info is None and shard in unreadable:
                    continue  # already reported for the whole shard
                if info is None:
                    problems.append(f"{INDEX_FILE} lists {key!r} in {shard} but no shard contains it")
                elif os.path.basename(info.file) != shard:
                    problems.append(f"{INDEX_FILE} puts {key!r} in {shard} but it is in {os.path.basename(info.file)}")
            for key in self.tensors.keys() - weight_map.keys():
                problems.append(f"tensor {key!r} of {os.path.basename(self.tensors[key].file)} is not in {INDEX_FILE}")
        if problems:
            raise SafetensorsError("\n".join(problems))

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def info(self, key: str) -> TensorInfo:
        return self.tensors[key]

    def read(self, key: str) -> np.ndarray:
        """A read-only memory map of one tensor (no copy); drop it when done to release the pages."""
        info = self.tensors[key]
        if info.nbytes == 0:
            return np.zeros(info.shape, info.numpy_dtype)
        return np.memmap(info.file, dtype=info.numpy_dtype, mode="r", offset=info.start, shape=info.shape)

    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())


# ---- writing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorPlan:
    """A tensor to write: its name, shape, dtype and a function producing its data on demand."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def plan_shards(plans: Sequence[TensorPlan], max_shard_bytes: int) -> list[list[TensorPlan]]:
    """Greedy split in the given order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for plan in plans:
        if shards[-1] and size + plan.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(plan)
        size += plan.nbytes
    return shards


def _encode_header(plans: Sequence[TensorPlan], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": dict(metadata)}
    offset = 0
    for plan in plans:
        header[plan.name] = {
            "dtype": DTYPE_NAMES[np.dtype(plan.dtype)],
            "shape": list(plan.shape),
            "data_offsets": [offset, offset + plan.nbytes],
        }
        offset += plan.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    # Pad with spaces so the data section starts 8-byte aligned, as the reference writer does.
    raw += b" " * ((8 - (8 + len(raw)) % 8) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_file(path: str, plans: Sequence[TensorPlan], metadata: dict[str, str] | None = None) -> None:
    """Writes one safetensors file, producing and writing one tensor at a time."""
    with open(path, "wb") as f:
        f.write(_encode_header(plans, metadata or {"format": "pt"}))
        for plan in plans:
            arr = plan.produce()
            if tuple(arr.shape) != tuple(plan.shape) or arr.dtype != np.dtype(plan.dtype):
                raise SafetensorsError(
                    f"internal error: {plan.name} produced {arr.dtype}{list(arr.shape)}, planned "
                    f"{np.dtype(plan.dtype)}{list(plan.shape)}"
                )
            # Little-endian raw bytes; view as bytes so bfloat16 needs no buffer-protocol support.
            f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)
            del arr


def write_checkpoint(
    directory: str,
    plans: Sequence[TensorPlan],
    *,
    max_shard_bytes: int = 5 * 1024**3,
    metadata: dict[str, str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[str]:
    """Writes `model.safetensors`, or `model-0000k-of-0000n.safetensors` shards plus the index.

    Returns the written file names. The tensors are produced lazily in the order of `plans`.
    """
    names = [p.name for p in plans]
    if len(set(names)) != len(names):
        raise SafetensorsError("internal error: duplicate tensor names in the write plan")
    shards = plan_shards(plans, max_shard_bytes)
    if len(shards) == 1:
        files = [SINGLE_FILE]
    else:
        files = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    for file, shard in zip(files, shards):
        if progress:
            progress(f"writing {file} ({len(shard)} tensors)")
        write_file(os.path.join(directory, file), shard, metadata)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": int(sum(p.nbytes for p in plans))},
            "weight_map": {p.name: file for file, shard in zip(files, shards) for p in shard},
        }
        with open(os.path.join(directory, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
    return files


def describe(tensors: Iterable[tuple[str, Sequence[int], str]]) -> str:
    """A table of (name, shape, dtype) rows."""
    rows = [(name, "[" + ", ".join(str(s) for s in shape) + "]", dtype) for name, shape, dtype in tensors]
    width = max((len(r[0]) for r in rows), default=4)
    swidth = max((len(r[1]) for r in rows), default=5)
    return "\n".join(f"{n:<{width}}  {s:<{swidth}}  {d}" for n, s, d in rows)
