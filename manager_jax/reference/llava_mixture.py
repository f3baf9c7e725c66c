"""The original's data-file loading, transcribed for parity tests of `manager_jax.data.mixture`.

Written from LLaVA-OV-Manager `LLaVA-NeXT/llava/train/train.py` (`LazySupervisedDataset.__init__`,
SPEC §5). Deliberately literal, quirks included:

- ``json_path`` is opened as written: relative to the working directory, ``~`` not expanded.
- ``sampling_strategy`` is split at ":"; a count with "%" keeps ``ceil(int(P) * len / 100)``.
- Only the exact names "first" / "end" / "random" with a count select; anything else (a name it
  does not know, a missing count, "all:5", "first :5") keeps every record.
- ``end:0`` is the slice ``[-0:]``: every record. Negative counts slice as Python does.
- ``random`` shuffles the whole file with the module-level ``random`` (never seeded before the
  data set is built), then keeps the first K. ``rng`` stands in for that generator here.
- One ``image_folder`` for every dataset (``os.path.join(image_folder, record["image"])``).
"""

from __future__ import annotations

import json
import math
import random

import yaml


def load_dataset_file(json_path: str) -> list:
    """The records of one ``json_path`` entry: JSON Lines line by line, or one JSON document."""
    if json_path.endswith(".jsonl"):
        with open(json_path) as f:
            return [json.loads(line.strip()) for line in f]
    if json_path.endswith(".json"):
        with open(json_path) as f:
            return json.load(f)
    raise ValueError(f"Unsupported file type: {json_path}")


def apply_strategy(records: list, sampling_strategy: str, rng: random.Random) -> list:
    """The records that one entry's ``sampling_strategy`` keeps, in the order it keeps them."""
    number = None
    if ":" in sampling_strategy:
        sampling_strategy, number = sampling_strategy.split(":")
        if "%" in number:
            number = math.ceil(int(number.split("%")[0]) * len(records) / 100)
        else:
            number = int(number)
    if number is None:
        return records
    if sampling_strategy == "first":
        return records[:number]
    if sampling_strategy == "end":
        return records[-number:]
    if sampling_strategy == "random":
        rng.shuffle(records)
        return records[:number]
    return records


def load_mixture(yaml_path: str, rng: random.Random | None = None) -> list:
    """All records a mixture YAML selects, datasets concatenated in file order."""
    rng = random.Random() if rng is None else rng
    with open(yaml_path) as f:
        datasets = yaml.safe_load(f).get("datasets")
    records = []
    for entry in datasets:
        records.extend(apply_strategy(load_dataset_file(entry.get("json_path")), entry.get("sampling_strategy", "all"), rng))
    return records
