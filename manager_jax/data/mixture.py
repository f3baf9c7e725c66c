"""YAML data mixtures (SPEC §5, ``train.py`` L995-1044).

Format::

    datasets:
      - json_path: data/a.json          # .json (array) or .jsonl
        sampling_strategy: first:1000   # all | first:K | end:K | random:K ; K a count or "P%"
      - json_path: data/b.jsonl
        sampling_strategy: random:30%
        image_folder: images/b          # optional extension: this dataset's image folder

The selected records of all datasets are concatenated in file order; ``all``, ``first:K``,
``end:K`` and ``P%`` (``ceil(P * len / 100)``) select record for record what the original
selects (tests/test_mixture.py against manager_jax/reference/llava_mixture.py). Relative paths
are relative to the working directory, as the original opens them. Where we differ:

- ``~`` is expanded (the original's own stage YAMLs write ``~/data/...``, which it would open
  literally).
- ``random:K`` shuffles with a generator seeded by (``data.seed``, dataset position), so every
  run and every host selects the same records. The original shuffles with Python's unseeded
  ``random`` (its HF Trainer seeds only later), so its subset differs from run to run and from
  rank to rank; only the count matches.
- ``P`` may be fractional ("2.5%"); the original accepts integers only.
- Refused with an error naming the entry, where the original silently keeps every record: a
  strategy it does not know (``sometimes:3``, ``First:3``, ``first :3``), a name without a count
  (``first``), ``all:K``, ``end:0`` / ``end:0%`` (its ``[-0:]`` slice), and a key other than
  ``json_path``, ``sampling_strategy`` and ``image_folder`` (a misspelt ``sampling_strategy``
  would mean all). A negative count, which it slices from the other end, is refused as well.
"""

from __future__ import annotations

import dataclasses
import fractions
import math
import os
import random
from typing import Any

import numpy as np
import yaml

from manager_jax.data.records import ConcatRecords, RecordFormatError, RecordSource, SubsetRecords, open_records

STRATEGIES = ("all", "first", "end", "random")


class MixtureError(ValueError):
    """A mixture file that does not follow the format above."""


@dataclasses.dataclass(frozen=True)
class MixtureEntry:
    json_path: str
    sampling_strategy: str = "all"
    image_folder: str | None = None
    where: str = ""  # "<yaml>: dataset <i> (<json_path as written>)", for error messages


def parse_strategy(strategy: str) -> tuple[str, str | None]:
    """"first:10%" -> ("first", "10%"); "all" -> ("all", None). Checks the count too."""
    if not isinstance(strategy, str) or not strategy:
        raise MixtureError(f"sampling_strategy must be a non-empty string such as 'all' or 'first:1000', got {strategy!r}")
    kind, colon, amount = strategy.partition(":")
    # Exact names only: the original compares them as written and keeps every record otherwise.
    if kind not in STRATEGIES:
        raise MixtureError(f"unknown sampling strategy {strategy!r}; expected one of {STRATEGIES} (with ':K')")
    if kind == "all":
        if colon:
            raise MixtureError(f"'all' takes no count, got {strategy!r}")
        return kind, None
    if not amount.strip():
        # The original treats "first" without a count as "all"; being explicit avoids surprises.
        raise MixtureError(f"{kind!r} needs a count, e.g. '{kind}:1000' or '{kind}:10%', got {strategy!r}")
    amount = amount.strip()
    if kind == "end" and resolve_count(amount, 1) == 0:  # only a zero count or 0% resolves to 0 here
        raise MixtureError(f"{strategy!r} is ambiguous: the original's [-0:] slice keeps every record; write 'all', "
                           "or drop the entry to keep none")
    resolve_count(amount, 0)  # a malformed count is found with the file, not at the first read
    return kind, amount


def resolve_count(amount: str, length: int) -> int:
    """A count "K" or a percentage "P%" (-> ceil(P * length / 100)) as a number of records."""
    try:
        if amount.endswith("%"):
            percent = fractions.Fraction(amount[:-1].strip())
            if percent < 0:
                raise ValueError
            return math.ceil(percent * length / 100)  # exact rational arithmetic, no float rounding
        count = int(amount)
        if count < 0:
            raise ValueError
        return count
    except (ValueError, ZeroDivisionError):
        raise MixtureError(f"bad sample count {amount!r}: expected a non-negative integer or 'P%'") from None


def select_indices(length: int, strategy: str, *, seed: int = 0, position: int = 0) -> np.ndarray:
    """Indices of the records a strategy keeps from a dataset of ``length`` records."""
    kind, amount = parse_strategy(strategy)
    if kind == "all":
        return np.arange(length, dtype=np.int64)
    count = min(resolve_count(amount, length), length)
    if kind == "first":
        return np.arange(count, dtype=np.int64)
    if kind == "end":
        return np.arange(length - count, length, dtype=np.int64)
    order = list(range(length))
    random.Random(f"mixture:{seed}:{position}").shuffle(order)  # string seeds hash stably
    return np.asarray(order[:count], np.int64)


ENTRY_KEYS = ("json_path", "sampling_strategy", "image_folder")


def read_mixture(path: str) -> list[MixtureEntry]:
    """Parse a mixture YAML into entries, their paths made absolute against the working directory
    (where the original opens them) with ``~`` expanded."""
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise MixtureError(f"{path}: invalid YAML ({err})") from None
        except UnicodeDecodeError as err:
            raise MixtureError(f"{path}: not UTF-8 text (byte {err.start}); re-encode it as UTF-8") from None
    datasets = data.get("datasets") if isinstance(data, dict) else None
    if not isinstance(datasets, list) or not datasets:
        raise MixtureError(f"{path}: expected a top-level 'datasets:' list")
    entries = []
    for i, item in enumerate(datasets):
        if not isinstance(item, dict) or not isinstance(item.get("json_path"), str):
            raise MixtureError(f"{path}: dataset {i} needs a 'json_path' string, got {item!r}")
        where = f"{path}: dataset {i} ({item['json_path']})"
        unknown = [key for key in item if key not in ENTRY_KEYS]
        if unknown:
            raise MixtureError(f"{where}: unknown key {unknown[0]!r}; an entry has {ENTRY_KEYS}")
        if not item["json_path"].endswith((".json", ".jsonl")):
            raise MixtureError(f"{where}: json_path must name a .json or .jsonl file")
        strategy = item.get("sampling_strategy", "all")
        try:
            parse_strategy(strategy)  # validate early
        except MixtureError as err:
            raise MixtureError(f"{where}: {err}") from None
        folder = item.get("image_folder")
        entries.append(
            MixtureEntry(
                json_path=_absolute(item["json_path"]),
                sampling_strategy=strategy,
                image_folder=None if folder is None else _absolute(str(folder)),
                where=where,
            )
        )
    return entries


def _absolute(path: str) -> str:
    # Fixed at read time: worker processes open the files later.
    return os.path.abspath(os.path.expanduser(path))


def load_mixture(path: str, *, seed: int = 0) -> RecordSource:
    """All selected records of a mixture YAML as one random-access source; MixtureError, naming
    the entry, for a dataset that cannot be read."""
    parts: list[Any] = []
    for position, entry in enumerate(read_mixture(path)):
        if entry.image_folder is not None and not os.path.isdir(entry.image_folder):
            # Otherwise each of its image records would be skipped as "missing_image", one by one.
            raise MixtureError(f"{entry.where}: image_folder {entry.image_folder}: no such directory")
        try:
            source = open_records(entry.json_path)
        except (OSError, RecordFormatError) as err:
            raise MixtureError(f"{entry.where}: {err}") from None
        indices = select_indices(len(source), entry.sampling_strategy, seed=seed, position=position)
        parts.append(SubsetRecords(source, indices, image_folder=entry.image_folder))
    return ConcatRecords(parts)
