"""``python run.py inspect-data``: what each record becomes, and why records are skipped.

    python run.py inspect-data --config configs/demo.py [--set data.seq_len=4096 ...]
        [--data PATH --image-folder DIR] [--limit N] [--json] [--strict]

Records are read in file order (no shuffle) and processed exactly as in training (images
opened and checked, token plan, template), without building the crops. ``--json`` prints one
JSON object per record::

    {"id", "image_sizes": [[W, H], ...], "num_crops", "image_tokens", "text_tokens",
     "supervised_tokens", "seq_len", "skipped": null | reason, "detail": null | what was wrong}

(``seq_len`` is the length after image expansion, before any truncation; records skipped
for their size, e.g. "too_long", still show their numbers) and then one line
``{"summary": {...}}`` with counts, a sequence-length histogram and the skip reasons. Without
``--json`` the same is printed as a table. ``--strict`` stops at the first bad record (exit 1).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from manager_jax import exit_status
from manager_jax.data.pipeline import DataConfig, open_source, sample_options
from manager_jax.data.samples import SkipCounter, SkipSample, check_limits, process_record, record_id

RECORD_KEYS = ("id", "image_sizes", "num_crops", "image_tokens", "text_tokens", "supervised_tokens", "seq_len", "skipped",
               "detail")


# ---------------------------------------------------------------------------------------------
# Config loading: the run recipe loader (manager_jax/train/recipe.py) when the file returns a
# TrainConfig, as `run.py train --config` does; a minimal loader for any other config object.
# ---------------------------------------------------------------------------------------------


def load_run_config(path: str | None, overrides: Sequence[str] = ()) -> tuple[Any, DataConfig]:
    """(model_config, data_config) from a config file with ``get_config()``.

    ``path`` (or ``path:arg``) and the "dotted.key=value" ``overrides`` follow
    ``manager_jax.train.recipe.load_recipe`` when ``get_config`` returns a TrainConfig. Otherwise
    the returned object only needs ``.model`` (ModelConfig) and ``.data`` (DataConfig); values are
    parsed as Python literals when possible, else kept as strings. Without a file: the default
    ModelConfig and DataConfig.
    """
    if path is None:
        from manager_jax.config import ModelConfig

        config: Any = argparse.Namespace(model=ModelConfig(), data=DataConfig())
        _apply_overrides(config, overrides)
        return config.model, config.data
    try:
        from manager_jax.train import recipe
    except ImportError:
        recipe = None
    if recipe is not None:
        try:
            run_config = recipe.load_recipe(path, overrides)
            return run_config.model, run_config.data
        except recipe.RecipeError as err:
            if "expected TrainConfig" not in str(err):
                raise
    return _load_plain_config(path, overrides)


def _load_plain_config(path: str, overrides: Sequence[str]) -> tuple[Any, DataConfig]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path!r}")
    spec = importlib.util.spec_from_file_location("_inspect_run_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path}: defines no get_config()")
    config = module.get_config()
    if not hasattr(config, "model") or not hasattr(config, "data"):
        raise ValueError(f"{path}: get_config() must return an object with .model and .data")
    _apply_overrides(config, overrides)
    return config.model, config.data


def _apply_overrides(config: Any, overrides: Sequence[str]) -> None:
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        _set_path(config, key.strip(), _parse_value(raw.strip()))
    config.model.validate()
    if dataclasses.is_dataclass(config.data):
        config.data.__post_init__()  # re-validate after overrides


def _parse_value(raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return {"none": None, "true": True, "false": False}.get(raw.lower(), raw)


def _set_path(obj: Any, dotted: str, value: Any) -> None:
    *parents, name = dotted.split(".")
    for part in parents:
        obj = getattr(obj, part)
    if not hasattr(obj, name):
        raise ValueError(f"unknown config key {dotted!r}")
    setattr(obj, name, value)


# ---------------------------------------------------------------------------------------------
# Inspection
# ---------------------------------------------------------------------------------------------


def _histogram(values: Sequence[int]) -> dict[str, int]:
    """Counts in power-of-two bins [0,256), [256,512), [512,1024), ..."""
    out: dict[str, int] = {}
    for v in sorted(values):
        hi = 256
        while v >= hi:
            hi *= 2
        label = f"{0 if hi == 256 else hi // 2}-{hi}"
        out[label] = out.get(label, 0) + 1
    return out


def inspect_records(model_config: Any, data_config: DataConfig, tokenizer: Any, *, limit: int | None, strict: bool):
    """An iterator that yields one dict per record (keys RECORD_KEYS), then returns the summary dict.

    The data is opened and the options checked now, so that their errors come before any row.
    """
    source = open_source(data_config)
    options = sample_options(data_config, model_config)
    return _inspect_rows(source, options, data_config, tokenizer, limit=limit, strict=strict)


def _inspect_rows(source: Any, options: Any, data_config: DataConfig, tokenizer: Any, *, limit: int | None, strict: bool):
    # Process without the batch limits so that oversized records still show their sizes.
    unlimited = dataclasses.replace(options, seq_len=None, max_crops=None, max_image_tokens=None)
    skips = SkipCounter()
    lengths, image_tokens, text_tokens, supervised, crops = [], 0, 0, 0, 0
    n = len(source) if limit is None else min(limit, len(source))
    for index in range(n):
        record = source[index]
        row: dict[str, Any] = dict.fromkeys(RECORD_KEYS)
        row["id"] = record_id(record, index)
        try:
            sample = process_record(record, tokenizer, unlimited, fallback_id=index, with_pixels=False)
        except SkipSample as skip:
            if strict:
                raise
            skips.add(skip)
            row["skipped"], row["detail"] = skip.reason, skip.detail
            yield row
            continue
        try:
            check_limits(sample.id, len(sample.ids), sample.plans, options)
        except SkipSample as skip:
            if strict:
                raise
            skips.add(skip)
            row["skipped"], row["detail"] = skip.reason, skip.detail
        row.update(
            image_sizes=[list(s) for s in sample.image_sizes],
            num_crops=sample.num_crops,
            image_tokens=sample.num_image_tokens,
            text_tokens=len(sample.ids) - sample.num_images,
            supervised_tokens=sample.supervised_tokens,
            seq_len=sample.expanded_length,
        )
        if row["skipped"] is not None:
            yield row
            continue
        lengths.append(row["seq_len"])
        image_tokens += row["image_tokens"]
        text_tokens += row["text_tokens"]
        supervised += row["supervised_tokens"]
        crops += row["num_crops"]
        yield row
    skip_summary = skips.summary()
    return {
        "records": n,
        "ok": len(lengths),
        "skipped": skip_summary["total"],
        "skip_reasons": skip_summary["by_reason"],
        "skip_examples": skip_summary["examples"],
        "skip_details": dict(sorted(skips.details.items())),  # the first record of each reason and what was wrong
        "image_tokens": image_tokens,
        "text_tokens": text_tokens,
        "supervised_tokens": supervised,
        "crops": crops,
        "max_seq_len": max(lengths, default=0),
        "mean_seq_len": (sum(lengths) / len(lengths)) if lengths else 0.0,
        "truncated": sum(1 for v in lengths if v > data_config.seq_len),
        "config_seq_len": data_config.seq_len,
        "seq_len_histogram": _histogram(lengths),
    }


_TABLE = [("id", 24), ("image_sizes", 22), ("num_crops", 5), ("image_tokens", 7), ("text_tokens", 7),
          ("supervised_tokens", 7), ("seq_len", 7), ("skipped", 20)]
_HEADERS = {"image_sizes": "sizes", "num_crops": "crops", "image_tokens": "img_tok", "text_tokens": "txt_tok", "supervised_tokens": "sup"}


def _table_line(row: dict[str, Any]) -> str:
    cells = []
    for key, width in _TABLE:
        value = row[key]
        if key == "image_sizes" and value is not None:
            value = ",".join(f"{w}x{h}" for w, h in value) or "-"
        text = "-" if value is None else str(value)
        cells.append(text[:width].ljust(width))
    return " ".join(cells).rstrip()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``run.py inspect-data``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="run.py inspect-data", description="Show what each data record becomes.")
    parser.add_argument("--config", default=None, help="Python config file defining get_config()")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--data", default=None, help="records (.json/.jsonl/mixture .yaml/ArrayRecord dir)")
    parser.add_argument("--image-folder", default=None)
    parser.add_argument("--limit", type=int, default=None, help="only the first N records")
    parser.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record")
    args = parser.parse_args(argv)
    try:
        rows = _open(args)
    except (ValueError, OSError) as err:  # the config, the data files, the tokenizer: one line, no traceback
        sys.stderr.write(f"error: {err}\n")
        return exit_status.BAD_INPUT
    out = sys.stdout
    if not args.json:
        out.write(" ".join(_HEADERS.get(k, k)[:w].ljust(w) for k, w in _TABLE).rstrip() + "\n")
    try:
        while True:
            row = next(rows)
            out.write((json.dumps(row) if args.json else _table_line(row)) + "\n")
    except StopIteration as stop:
        summary = stop.value
    except SkipSample as skip:
        sys.stderr.write(f"error: {skip}\n")
        return exit_status.FAILED
    if args.json:
        out.write(json.dumps({"summary": summary}) + "\n")
    else:
        out.write("\n" + json.dumps(summary, indent=1) + "\n")
    return exit_status.OK


def _open(args: argparse.Namespace) -> Any:
    """The rows iterator for the command line's config, overrides and data."""
    model_config, data_config = load_run_config(args.config, args.overrides)
    if args.data is not None:
        is_mixture = args.data.endswith((".yaml", ".yml"))
        data_config = dataclasses.replace(
            data_config, data_path=None if is_mixture else args.data, mixture=args.data if is_mixture else None
        )
    if args.image_folder is not None:
        data_config = dataclasses.replace(data_config, image_folder=args.image_folder)
    if data_config.image_folder and not os.path.isdir(data_config.image_folder):
        # As `run.py train` does: otherwise every image record would just read "missing_image".
        raise FileNotFoundError(f"image folder {data_config.image_folder!r}: no such directory")

    from manager_jax.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(data_config.tokenizer_path)
    return inspect_records(model_config, data_config, tokenizer, limit=args.limit, strict=args.strict)


if __name__ == "__main__":
    sys.exit(main())
