"""One LLaVA record -> a :class:`~manager_jax.batch.ProcessedSample`, or a counted skip.

Steps (SPEC §3, §4, §5; ``train.py _get_item``): check the record, normalise ``<image>``
placement (image records only), build ids and labels with the ``plain`` or ``qwen_1_5`` template,
open and convert every image to RGB (CMYK, palette, RGBA, 16-bit ... are converted, not skipped),
plan its tokens and crops (several images force ``pad`` mode), check the sample fits the batch
shapes, then normalise the crops.

Bad input raises :class:`SkipSample` with a short reason and the record id (DESIGN.md "Bad
input"); :class:`SkipCounter` tallies them and logs a summary. Configuration mistakes (an unknown
mode, a flat anyres "grid" Manager) raise ``ValueError`` when :class:`SampleOptions` is built, so they
can never be mistaken for bad records.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from manager_jax import multigrid
from manager_jax.config import ANYRES_MAX_9_PINPOINTS
from manager_jax.batch import ProcessedSample
from manager_jax.data import conversation as conv
from manager_jax.data.image_processing import crop_pixels, image_crops, load_rgb

logger = logging.getLogger(__name__)

__all__ = ["ProcessedSample", "SampleOptions", "SkipCounter", "SkipSample", "check_limits", "process_record", "record_id"]

TEMPLATES = ("plain", "qwen_1_5")

# Reasons raised here (ConversationError reasons from conversation.py pass through unchanged:
# bad_turn, unknown_role, leading_system_turn, empty_conversation, no_assistant_turn,
# plain_needs_two_turns, plain_needs_image).
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
TRUNCATED_IMAGE = "truncated_image"
ZERO_SIZE_IMAGE = "zero_size_image"
IMAGE_TOO_LARGE = "image_too_large"  # PIL decompression-bomb guard
BAD_RECORD = "bad_record"
VIDEO_UNSUPPORTED = "video_unsupported"
NO_CONVERSATIONS = "no_conversations"
IMAGE_COUNT_MISMATCH = "image_count_mismatch"
TOO_LONG = "too_long"
TOO_MANY_CROPS = "too_many_crops"
TOO_MANY_IMAGE_TOKENS = "too_many_image_tokens"
UNEXPECTED_ERROR = "unexpected_error"  # anything else (only the pipeline uses it)


class SkipSample(Exception):
    """A record that cannot become a training sample; ``reason`` is short and machine readable."""

    def __init__(self, reason: str, record_id: str, detail: str = "") -> None:
        self.reason = reason
        self.record_id = str(record_id)
        self.detail = detail
        super().__init__(f"record {self.record_id!r} skipped ({reason})" + (f": {detail}" if detail else ""))

    def __reduce__(self):  # exceptions with extra constructor args need this to pickle
        return (SkipSample, (self.reason, self.record_id, self.detail))


class SkipCounter:
    """Counts skipped records by reason and keeps the first ``max_examples`` ids of each, and the
    detail of the first one (e.g. the image path that was not found)."""

    def __init__(self, max_examples: int = 5) -> None:
        self.max_examples = max_examples
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}
        self.details: dict[str, str] = {}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, skip: SkipSample) -> None:
        self.add_reason(skip.reason, skip.record_id, skip.detail)

    def add_reason(self, reason: str, record_id: str, detail: str = "") -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if reason not in self.details:
            self.details[reason] = f"record {record_id!s}" + (f": {detail}" if detail else "")
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self.max_examples:
            examples.append(str(record_id))

    def summary(self) -> dict[str, Any]:
        """{"total": n, "by_reason": {reason: count}, "examples": {reason: [ids]}}, reasons sorted."""
        reasons = sorted(self.counts)
        return {
            "total": self.total,
            "by_reason": {r: self.counts[r] for r in reasons},
            "examples": {r: list(self.examples.get(r, [])) for r in reasons},
        }

    def log_summary(self, log: logging.Logger | None = None) -> None:
        log = log or logger
        if not self.total:
            log.info("no records skipped")
            return
        lines = [f"  {r}: {n} (e.g. {', '.join(self.examples.get(r, []))})" for r, n in sorted(self.counts.items())]
        log.warning("skipped %d records:\n%s", self.total, "\n".join(lines))

    # JSON-compatible state, saved with the data iterator.
    def get_state(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "examples": {k: list(v) for k, v in self.examples.items()},
                "details": dict(self.details)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.counts = {str(k): int(v) for k, v in state.get("counts", {}).items()}
        self.examples = {str(k): [str(i) for i in v] for k, v in state.get("examples", {}).items()}
        self.details = {str(k): str(v) for k, v in state.get("details", {}).items()}


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    """How records become samples, and the limits a sample must meet to fit a batch.

    Attributes:
      template: "plain" (stage 1) or "qwen_1_5".
      image_mode: ``image_aspect_ratio`` for single-image records (square / pad / anyres /
        anyres_max_N); records with several images always use "pad" (SPEC §5).
      pinpoints: ``image_grid_pinpoints`` (any form multigrid.parse_pinpoints takes).
      convention: "original" or "hf" (docs/CONTRACTS.md §1).
      unpad: ``"unpad" in mm_patch_merge_type``.
      grid_type: Manager grid type for ``plan.manager`` (None without a Manager).
      max_tiles: optional cap on tiles per image (not in the original).
      image_folder: folder that relative image paths are resolved against.
      seq_len: sequence length S; None = no length check.
      truncate: True keeps samples longer than ``seq_len`` (batch assembly cuts them, parity
        mode); False skips them with reason "too_long" (packing never cuts a sample).
      max_crops, max_image_tokens: per-batch budgets; a sample needing more is skipped.
    """

    template: str = "qwen_1_5"
    image_mode: str = "anyres_max_9"
    pinpoints: Any = ANYRES_MAX_9_PINPOINTS
    convention: str = "original"
    unpad: bool = True
    grid_type: str | None = None
    max_tiles: int | None = None
    image_folder: str | None = None
    seq_len: int | None = None
    truncate: bool = False
    max_crops: int | None = None
    max_image_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {self.template!r}")
        # Plan a dummy image so that a bad mode / pinpoints / convention fails here, not per record.
        multigrid.plan_image(
            (640, 480), mode=self.image_mode, pinpoints=self.pinpoints, convention=self.convention,
            max_tiles=self.max_tiles, unpad=self.unpad, grid_type=self.grid_type,
        )

    @classmethod
    def from_configs(cls, model_config: Any, **overrides: Any) -> "SampleOptions":
        """Image options from a ModelConfig (``cfg.image``, ``cfg.manager``), the rest from overrides."""
        image = model_config.image
        manager = model_config.manager
        fields = dict(
            image_mode=image.aspect_ratio,
            pinpoints=image.grid_pinpoints,
            convention=image.convention,
            unpad="unpad" in image.patch_merge_type,
            grid_type=manager.grid_type if manager.enabled else None,
        )
        fields.update(overrides)
        return cls(**fields)


def record_id(record: Any, fallback: Any = None) -> str:
    """The record's "id" field, else ``fallback`` (e.g. its index), else "?"."""
    if isinstance(record, Mapping) and record.get("id") is not None:
        return str(record["id"])
    return "?" if fallback is None else str(fallback)


def _image_entries(record: Mapping[str, Any], rid: str) -> list[tuple[str, bytes | None]]:
    """(name, bytes-or-None) per image. Bytes come from ArrayRecord datasets ("image_bytes")."""
    names = record.get("image")
    if names is None and record.get("video") is not None:
        # LLaVA-Video records: without this, "<image> in the text, 0 images" would hide the cause.
        raise SkipSample(VIDEO_UNSUPPORTED, rid, f"video records are not supported ('video': {record['video']!r:.80}); "
                         "give the frames as a list of images in 'image'")
    if names is None:
        names = []
    elif isinstance(names, str):
        names = [names]
    elif not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise SkipSample(BAD_RECORD, rid, f"'image' must be a path or a list of paths, got {names!r:.120}")
    blobs = record.get("image_bytes")
    if blobs is None:
        return [(n, None) for n in names]
    if isinstance(blobs, (bytes, bytearray)):
        blobs = [blobs]
    blobs = list(blobs)
    if names and len(names) != len(blobs):
        raise SkipSample(BAD_RECORD, rid, f"{len(names)} image names but {len(blobs)} image byte strings")
    names = list(names) or [f"image_{i}" for i in range(len(blobs))]
    return [(n, bytes(b)) for n, b in zip(names, blobs)]


def read_image_file(path: str, rid: str) -> bytes:
    """The bytes of an image file; SkipSample when it is missing or unreadable."""
    if not os.path.isfile(path):
        raise SkipSample(MISSING_IMAGE, rid, f"no file {path!r}")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise SkipSample(UNREADABLE_IMAGE, rid, f"{path!r}: {err}") from None


@contextlib.contextmanager
def image_errors(name: str, rid: str):
    """PIL's errors opening or decoding image `name` of record `rid` -> SkipSample (by reason)."""
    try:
        yield
    except Image.DecompressionBombError as err:  # not an OSError
        raise SkipSample(IMAGE_TOO_LARGE, rid, f"{name!r}: {err}") from None
    except UnidentifiedImageError as err:
        raise SkipSample(UNREADABLE_IMAGE, rid, f"{name!r}: {err}") from None
    except (OSError, SyntaxError, ValueError) as err:
        reason = TRUNCATED_IMAGE if "truncated" in str(err).lower() else UNREADABLE_IMAGE
        raise SkipSample(reason, rid, f"{name!r}: {err}") from None


def decode_image(img: Image.Image, name: str, rid: str) -> Image.Image:
    """Decodes an opened image now (a truncated file fails here, not later in a worker or a
    batch); bad or zero-size ones -> SkipSample. One that fails to decode is closed: opened lazily
    from a path (`Image.open(path)`, as a task's visuals may be), it kept its file open."""
    try:
        with image_errors(name, rid):
            img.load()
    except SkipSample:
        img.close()
        raise
    if img.width == 0 or img.height == 0:
        raise SkipSample(ZERO_SIZE_IMAGE, rid, f"{name!r} is {img.width}x{img.height}")
    return img


def load_image(
    name: str, data: bytes | None, *, image_folder: str | None, rid: str, convention: str = "original"
) -> Image.Image:
    """Open one image fully (from ``data`` or the file) and convert it to RGB (``load_rgb`` under
    ``convention``); bad ones -> SkipSample."""
    if data is None:
        data = read_image_file(name if image_folder is None else os.path.join(image_folder, name), rid)
    if len(data) == 0:
        raise SkipSample(ZERO_SIZE_IMAGE, rid, f"{name!r} is an empty file")
    with image_errors(name, rid):
        # No context manager: Image.close() would invalidate the decoded pixels we return.
        img = decode_image(Image.open(io.BytesIO(data)), name, rid)
        return load_rgb(img, convention)


def _conversations(record: Any, rid: str) -> list[Mapping[str, Any]]:
    if not isinstance(record, Mapping):
        raise SkipSample(BAD_RECORD, rid, f"a record must be a JSON object, got {type(record).__name__}")
    if "_error" in record:  # set by JsonlRecords for a line that is not valid JSON
        raise SkipSample(BAD_RECORD, rid, str(record["_error"]))
    turns = record.get("conversations")
    if turns is None or (isinstance(turns, (list, tuple)) and len(turns) == 0):
        raise SkipSample(NO_CONVERSATIONS, rid, "missing or empty 'conversations'")
    if not isinstance(turns, (list, tuple)) or not all(isinstance(t, Mapping) for t in turns):
        raise SkipSample(BAD_RECORD, rid, "'conversations' must be a list of {'from', 'value'} objects")
    return list(turns)


def process_record(
    record: Mapping[str, Any],
    tokenizer: Any,
    options: SampleOptions,
    *,
    fallback_id: Any = None,
    with_pixels: bool = True,
) -> ProcessedSample:
    """Turn one LLaVA record into a :class:`ProcessedSample`; raise :class:`SkipSample` on bad input.

    ``record``: {"id", "conversations": [{"from", "value"}], "image": path | [paths] (optional)},
    optionally "image_bytes" (ArrayRecord datasets) and "_image_folder" (set by mixtures).
    ``with_pixels=False`` still opens and checks every image but skips the crops: ``pixels`` is
    then uint8 [n_crops, 0, 0, 3] (for inspection tools).
    """
    rid = record_id(record, fallback_id)
    turns = _conversations(record, rid)
    entries = _image_entries(record, rid)
    n_images = len(entries)
    # As `_get_item`: a record with an "image" field is an image record even when the list is empty.
    image_record = record.get("image") is not None or record.get("image_bytes") is not None
    try:
        if image_record:
            turns = conv.normalize_image_placement(turns)
        if options.template == "plain":
            ids, labels = conv.build_plain(turns, tokenizer)
        else:
            ids, labels = conv.build_qwen_1_5(turns, tokenizer, has_image=image_record)
    except conv.ConversationError as err:
        raise SkipSample(err.reason, rid, str(err)) from None
    ids = np.asarray(ids, np.int32)
    labels = np.asarray(labels, np.int32)
    placeholders = int((ids == conv.IMAGE_TOKEN_INDEX).sum())
    if placeholders != n_images and not (n_images == 1 and placeholders == 0):
        # Only one image and no "<image>" left (none in the text, or only in a dropped leading gpt
        # turn) is well defined in the original: the image is encoded and not inserted.
        raise SkipSample(IMAGE_COUNT_MISMATCH, rid, f"{placeholders} <image> in the prompt, {n_images} images")
    if options.truncate and options.seq_len is not None:
        # The collator's cut to model_max_length, before pad ids are dropped and images expanded.
        ids, labels = ids[: options.seq_len], labels[: options.seq_len]
    # The original drops every pad id (<|endoftext|>, also literal in a text) before the model:
    # the collator's attention_mask is ids != pad, and the image insertion keeps unmasked ids only.
    keep = ids != tokenizer.pad_id
    ids, labels = ids[keep], labels[keep]

    folder = record.get("_image_folder", options.image_folder) if isinstance(record, Mapping) else options.image_folder
    images = [load_image(name, data, image_folder=folder, rid=rid, convention=options.convention) for name, data in entries]
    # Images whose "<image>" is gone (none in the text, or cut off) are checked, as the original
    # opens them (a bad one still skips the record), but not inserted.
    images = images[: int((ids == conv.IMAGE_TOKEN_INDEX).sum())]
    mode = "pad" if n_images > 1 else options.image_mode
    plans = [
        multigrid.plan_image(
            img.size, mode=mode, pinpoints=options.pinpoints, convention=options.convention,
            max_tiles=options.max_tiles, unpad=options.unpad, grid_type=options.grid_type,
        )
        for img in images
    ]
    check_limits(rid, len(ids), plans, options)

    if not with_pixels:
        pixels = np.zeros((sum(p.num_crops for p in plans), 0, 0, 3), np.uint8)
        return ProcessedSample(id=rid, ids=ids, labels=labels, pixels=pixels, plans=plans, image_sizes=[img.size for img in images])
    crops = []
    for img in images:
        crops.extend(
            image_crops(img, mode=mode, pinpoints=options.pinpoints, convention=options.convention, max_tiles=options.max_tiles)
        )
    pixels = crop_pixels(crops) if crops else np.zeros((0, multigrid.PATCH, multigrid.PATCH, 3), np.uint8)
    return ProcessedSample(id=rid, ids=ids, labels=labels, pixels=pixels, plans=plans, image_sizes=[img.size for img in images])


def check_limits(rid: str, n_ids: int, plans: Sequence[multigrid.ImagePlan], options: SampleOptions) -> None:
    """SkipSample when a sample cannot fit a batch (checked before any pixel work)."""
    image_tokens = sum(p.num_tokens for p in plans)
    crops = sum(p.num_crops for p in plans)
    length = n_ids - len(plans) + image_tokens
    if options.seq_len is not None and not options.truncate and length > options.seq_len:
        raise SkipSample(TOO_LONG, rid, f"{length} tokens after image expansion > seq_len {options.seq_len}")
    if options.max_crops is not None and crops > options.max_crops:
        raise SkipSample(TOO_MANY_CROPS, rid, f"{crops} crops > max_crops {options.max_crops}")
    if options.max_image_tokens is not None and image_tokens > options.max_image_tokens:
        raise SkipSample(TOO_MANY_IMAGE_TOKENS, rid, f"{image_tokens} image tokens > max_image_tokens {options.max_image_tokens}")
