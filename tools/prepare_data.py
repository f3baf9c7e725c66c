"""Convert LLaVA JSON / JSONL / mixture YAML + an image folder into ArrayRecord files.

The output embeds every image's encoded bytes in its record (format: manager_jax/data/tfds_source.py),
so training reads one sharded dataset instead of millions of small files::

    python -m tools.prepare_data --data data/llava.json --image-folder data/images --out data/llava_ar
    python -m tools.prepare_data --data mixture.yaml --out data/stage2_ar --num-shards 64

Records whose images are missing or empty (or, with ``--verify-images``, do not decode) are left out
and counted (the summary is printed and stored in ``llava_records.json``); ``--strict`` stops at
the first one instead. Without ``--verify-images`` an undecodable file is embedded as it is, and
training skips its record (``unreadable_image``). More than
``--max-skip-fraction`` (default 0.5, as training's ``data.max_skip_fraction``) of the records left
out fails the conversion (a wrong ``--image-folder``, say): training on such a dataset would never
see the skips, only the text-only records that remain. The output
folder is written under a temporary name and renamed at the end, so a failed (or killed) run leaves
no half-written dataset; ``--overwrite`` never replaces a folder that holds the data or the images.
Exit statuses as every command (manager_jax/exit_status.py): 2 for bad input (an existing ``--out``
without ``--overwrite``, unreadable data or no records), 1 for a record ``--strict`` rejects or too
many records (or all of them) left out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from manager_jax import exit_status
from manager_jax.data import tfds_source
from manager_jax.data.ordering import modality_length
from manager_jax.data.mixture import load_mixture, read_mixture
from manager_jax.data.records import RecordFormatError, RecordSource, expand_data_path, open_records
from manager_jax.data.samples import (
    BAD_RECORD,
    ZERO_SIZE_IMAGE,
    SkipCounter,
    SkipSample,
    load_image,
    read_image_file,
    record_id,
)


SPLIT_NAME = re.compile(r"[A-Za-z0-9_]+")


def _image_names(record: Any) -> list[str]:
    names = record.get("image") if isinstance(record, dict) else None
    if names is None:
        return []
    if isinstance(names, str):
        return [names]
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
        return list(names)
    raise SkipSample(BAD_RECORD, record_id(record), f"'image' must be a path or a list of paths, got {names!r:.80}")


def read_image_bytes(record: dict, image_folder: str | None, *, verify: bool, rid: str) -> list[bytes]:
    """The encoded files of a record's images; SkipSample when one is missing / empty / unreadable."""
    folder = record.get("_image_folder", image_folder)
    blobs = []
    for name in _image_names(record):
        path = name if folder is None else os.path.join(folder, name)
        data = read_image_file(path, rid)
        if not data:
            raise SkipSample(ZERO_SIZE_IMAGE, rid, f"{path!r} is empty")
        if verify:
            load_image(name, data, image_folder=None, rid=rid)  # same checks as training
        blobs.append(data)
    return blobs


class TooManySkipped(RuntimeError):
    """More than the allowed share of the records were left out; nothing was written."""


def convert_records(
    source: RecordSource,
    out_dir: str,
    *,
    image_folder: str | None = None,
    split: str = "train",
    num_shards: int = 1,
    verify_images: bool = False,
    strict: bool = False,
    overwrite: bool = False,
    max_skip_fraction: float = 0.5,
    sources: Sequence[str] = (),
) -> dict:
    """Write ``source`` to ``out_dir`` (see the module docstring); returns the skip summary.
    Raises TooManySkipped, writing nothing, when more than ``max_skip_fraction`` of the records
    were left out (1: never) or none is left. ``sources``: the files and folders read (an
    ``overwrite`` that would replace one of them, or a folder holding one, is refused)."""
    from manager_jax.params_io import DestinationExists, write_atomically

    result = {}

    def fill(tmp_dir: str) -> None:
        skips = SkipCounter()
        writer = tfds_source.ArrayRecordWriterSet(tmp_dir, split, len(source), num_shards)
        lengths = []  # group_by_modality_length reads these instead of every record
        try:
            for index in range(len(source)):
                record = source[index]
                rid = record_id(record, index)
                try:
                    if not isinstance(record, dict):
                        raise SkipSample(BAD_RECORD, rid, "not a JSON object")
                    if "_error" in record:  # an invalid JSONL line
                        raise SkipSample(BAD_RECORD, rid, str(record["_error"]))
                    blobs = read_image_bytes(record, image_folder, verify=verify_images, rid=rid)
                except SkipSample as skip:
                    if strict:
                        raise
                    skips.add(skip)
                    continue
                clean = dict(record)
                clean.setdefault("id", rid)
                writer.write(tfds_source.serialize_record(clean, blobs))
                lengths.append(modality_length(clean))
            writer.close()
        finally:
            writer.discard()
        if skips.total > max_skip_fraction * len(source) or not writer.written:
            top = sorted(skips.counts.items(), key=lambda kv: -kv[1])[:3]
            reasons = "; ".join(f"{r}: {n} (first: {skips.details[r]})" for r, n in top)
            raise TooManySkipped(
                f"{skips.total} of the {len(source)} records ({100 * skips.total / len(source):.0f}%) were left out, "
                + (f"more than --max-skip-fraction={max_skip_fraction}" if writer.written else "every one") +
                f": {reasons}. Check the data and --image-folder"
                + (", or raise --max-skip-fraction (1 keeps whatever is readable)" if writer.written else ""))
        summary = skips.summary()
        tfds_source.write_metadata(tmp_dir, {split: writer}, extra={"conversion_skips": summary},
                                   modality_lengths={split: lengths})
        result.update(written=writer.written, skipped=summary)

    try:
        write_atomically(out_dir, fill, overwrite, sources=sources)
    except DestinationExists:
        raise FileExistsError(f"{out_dir!r} exists; pass --overwrite to replace it, or another --out") from None
    return result


def input_paths(data: str, image_folder: str | None) -> list[str]:
    """The files and folders a conversion of `data` reads (what --overwrite must not replace)."""
    paths = [image_folder, *expand_data_path(data)]
    if data.endswith((".yaml", ".yml")):
        paths += [path for entry in read_mixture(data) for path in (entry.json_path, entry.image_folder)]
    return [path for path in paths if path]


def open_any(data: str, *, seed: int = 0) -> RecordSource:
    """JSON / JSONL / brace pattern, or a mixture YAML; RecordFormatError when it holds no records
    (training refuses such a data set, so converting it would only defer the error)."""
    source = load_mixture(data, seed=seed) if data.endswith((".yaml", ".yml")) else open_records(data)
    if len(source) == 0:
        raise RecordFormatError(f"{data}: no records")
    return source


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.prepare_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="LLaVA .json / .jsonl / 'dir/{a,b}.json' / mixture .yaml")
    parser.add_argument("--image-folder", default=None, help="folder that image paths are relative to")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--split", default="train", help="name of the split written: letters, digits, _ (default: train)")
    parser.add_argument("--num-shards", type=int, default=1,
                        help="ArrayRecord files to write, at most one per record (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of random:K mixture strategies")
    parser.add_argument("--verify-images", action="store_true",
                        help="decode every image (slower), leaving out records whose images do not decode")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--max-skip-fraction", type=float, default=0.5,
                        help="fail, writing nothing, when more than this share of the records is left out "
                             "(default: 0.5; 1: never)")
    args = parser.parse_args(argv)
    # Bad input is one `error:` line and status 2 before anything is written (manager_jax/exit_status.py).
    if args.num_shards < 1:
        parser.error(f"--num-shards must be >= 1, got {args.num_shards}")
    if not SPLIT_NAME.fullmatch(args.split):  # a file name part: `<dataset>-<split>.array_record-...`
        parser.error(f"--split must be letters, digits and '_' (a TFDS split name such as train), got {args.split!r}")
    if not 0 <= args.max_skip_fraction <= 1:
        parser.error(f"--max-skip-fraction must lie in [0, 1], got {args.max_skip_fraction}")
    if os.path.exists(args.out) and not args.overwrite:
        return _error(f"{args.out!r} exists; pass --overwrite to replace it, or another --out", exit_status.BAD_INPUT)
    from manager_jax.params_io import ParamsError, destination_problem  # (imports Orbax: not for --help)

    problem = destination_problem(args.out)  # under a file, in a read-only folder: known before any record is read
    if problem:
        return _error(f"--out: {problem}", exit_status.BAD_INPUT)
    if args.image_folder is not None and not os.path.isdir(args.image_folder):
        return _error(f"--image-folder {args.image_folder!r} is not a directory", exit_status.BAD_INPUT)
    try:
        source = open_any(args.data, seed=args.seed)
    except (ValueError, OSError) as err:
        return _error(str(err), exit_status.BAD_INPUT)
    if args.num_shards > len(source):
        return _error(f"--num-shards {args.num_shards} is more than the {len(source)} records of {args.data}",
                      exit_status.BAD_INPUT)
    try:
        result = convert_records(
            source, args.out, image_folder=args.image_folder, split=args.split, num_shards=args.num_shards,
            verify_images=args.verify_images, strict=args.strict, overwrite=args.overwrite,
            max_skip_fraction=args.max_skip_fraction, sources=input_paths(args.data, args.image_folder),
        )
    except ParamsError as err:  # --overwrite of a folder holding the data or the images
        return _error(f"--out: {err}", exit_status.BAD_INPUT)
    except SkipSample as skip:  # --strict: the check it was asked for failed; nothing was written
        return _error(f"{skip}; nothing written", exit_status.FAILED)
    except TooManySkipped as err:
        return _error(f"{err}; nothing written", exit_status.FAILED)
    except OSError as err:  # e.g. disk full; the partial output has been removed
        return _error(f"{err}; nothing written", exit_status.FAILED)
    except KeyboardInterrupt:
        return _error("interrupted; nothing written", exit_status.INTERRUPTED)
    print(json.dumps(result, indent=1))
    return exit_status.OK


def _error(message: str, status: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
