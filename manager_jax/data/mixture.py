"""YAML data mixtures (SPEC §5, ``train.py`` L995-1044).

Format::

    datasets:
      - json_path: data/a.json          # .json (array) or .jsonl; relative to the YAML's folder
        sampling_strategy: first:1000   # all | first:K | end:K | random:K ; K a count or "P%"
      - json_path: data/b.jsonl
        sampling_strategy: random:30%
        image_folder: images/b          # optional extension: this dataset's image folder

``P%`` keeps ``ceil(P * len / 100)`` records (P may be fractional here; the original only
accepts integers). ``random:K`` shuffles with a generator seeded by (seed, dataset position), so
a mixture is reproducible (the original uses Python's unseeded ``random``). A K larger than the
dataset keeps everything; ``end:0`` keeps nothing (the original's ``[-0:]`` would keep all).
The selected records of all datasets are concatenated in file order.
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

from manager_jax.data.records import ConcatRecords, RecordSource, SubsetRecords, open_records

STRATEGIES = ("all", "first", "end", "random")


class MixtureError(ValueError):
    """A mixture file that does not follow the format above."""


@dataclasses.dataclass(frozen=True)
class MixtureEntry:
    json_path: str
    sampling_strategy: str = "all"
    image_folder: str | None = None


def parse_strategy(strategy: str) -> tuple[str, str | None]:
    """"first:10%" -> ("first", "10%"); "all" -> ("all", None)."""
    if not isinstance(strategy, str) or not strategy.strip():
        raise MixtureError(f"sampling_strategy must be a non-empty string, got {strategy!r}")
    kind, _, amount = strategy.strip().partition(":")
    kind = kind.strip()
    if kind not in STRATEGIES:
        raise MixtureError(f"unknown sampling strategy {strategy!r}; expected one of {STRATEGIES} (with ':K')")
    if kind == "all":
        if amount:
            raise MixtureError(f"'all' takes no count, got {strategy!r}")
        return kind, None
    if not amount.strip():
        # The original treats "first" without a count as "all"; being explicit avoids surprises.
        raise MixtureError(f"{kind!r} needs a count, e.g. '{kind}:1000' or '{kind}:10%', got {strategy!r}")
    return kind, amount.strip()


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


def read_mixture(path: str) -> list[MixtureEntry]:
    """Parse a mixture YAML into entries with paths resolved against the YAML's folder."""
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
    base = os.path.dirname(os.path.abspath(path))
    entries = []
    for i, item in enumerate(datasets):
        if not isinstance(item, dict) or not isinstance(item.get("json_path"), str):
            raise MixtureError(f"{path}: dataset {i} needs a 'json_path' string, got {item!r}")
        strategy = str(item.get("sampling_strategy", "all"))
        try:
            parse_strategy(strategy)  # validate early
        except MixtureError as err:
            raise MixtureError(f"{path}: dataset {i} ({item['json_path']}): {err}") from None
        folder = item.get("image_folder")
        entries.append(
            MixtureEntry(
                json_path=os.path.join(base, os.path.expanduser(item["json_path"])),
                sampling_strategy=strategy,
                image_folder=None if folder is None else os.path.join(base, os.path.expanduser(str(folder))),
            )
        )
    return entries


def load_mixture(path: str, *, seed: int = 0) -> RecordSource:
    """All selected records of a mixture YAML as one random-access source."""
    parts: list[Any] = []
    for position, entry in enumerate(read_mixture(path)):
        if entry.image_folder is not None and not os.path.isdir(entry.image_folder):
            # Otherwise each of its image records would be skipped as "missing_image", one by one.
            raise MixtureError(f"{path}: dataset {position} ({entry.json_path}): image_folder {entry.image_folder}: "
                               "no such directory")
        source = open_records(entry.json_path)
        indices = select_indices(len(source), entry.sampling_strategy, seed=seed, position=position)
        parts.append(SubsetRecords(source, indices, image_folder=entry.image_folder))
    return ConcatRecords(parts)
