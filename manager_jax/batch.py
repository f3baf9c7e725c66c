"""The fixed-shape batch the model consumes, and its assembly from processed samples.

docs/CONTRACTS.md §2. A :class:`ProcessedSample` holds one record after image preprocessing and
tokenization: ids with one ``IMAGE_TOKEN_INDEX`` (-200) per image (not yet expanded), labels,
uint8 RGB crops and one :class:`~manager_jax.multigrid.ImagePlan` per image.
:func:`assemble_batch` expands every image sentinel into the plan's T positions, cuts to
``seq_len`` after expansion (SPEC §2.5: the original truncates the embeddings after expansion),
packs or pads the rows, and turns the plans into batch-global gather/scatter indices. The data
pipeline and the inference code both use it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from manager_jax import multigrid
from manager_jax.pixels import normalize
from manager_jax.data.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from manager_jax.data.packing import BatchShapeError, first_fit_rows

# `DEFAULT_IM_START_TOKEN_QWEN_ID` of the original (llava/constants.py), used by the query rule.
IM_START_TOKEN_ID = 151644
PATCHES_PER_CROP = multigrid.GRID_TOKENS**2  # 729
ADAPTIVE_QUERY_TYPES = ("last", "average", "cross")  # query types that read an extra query

__all__ = [
    "ADAPTIVE_QUERY_TYPES",
    "Batch",
    "BatchShapeError",
    "IM_START_TOKEN_ID",
    "ProcessedSample",
    "assemble_batch",
    "expand_sample",
    "query_positions",
]


@dataclasses.dataclass(eq=False)
class ProcessedSample:
    """One record ready for batching (output of :func:`manager_jax.data.samples.process_record`).

    Attributes:
      id: the record id (for skip reports and debugging).
      ids: int32 [n] token ids; one ``IMAGE_TOKEN_INDEX`` (-200) where each image goes.
      labels: int32 [n] unshifted labels, ``IGNORE_INDEX`` (-100) where unsupervised.
      pixels: uint8 [n_crops_total, 384, 384, 3] RGB crops of all images, image by image.
      plans: one ImagePlan per image, in the order of the sentinels in ``ids``.
      image_sizes: (W, H) of each source image (informational).
    """

    id: str
    ids: np.ndarray
    labels: np.ndarray
    pixels: np.ndarray
    plans: list[multigrid.ImagePlan]
    image_sizes: list[tuple[int, int]] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids, np.int32)
        self.labels = np.asarray(self.labels, np.int32)
        if self.ids.ndim != 1 or self.ids.shape != self.labels.shape:
            raise ValueError(f"sample {self.id!r}: ids {self.ids.shape} and labels {self.labels.shape} must be equal 1-D")
        n_sentinels = int((self.ids == IMAGE_TOKEN_INDEX).sum())
        if n_sentinels != len(self.plans):
            raise ValueError(f"sample {self.id!r}: {n_sentinels} image sentinels but {len(self.plans)} image plans")
        crops = sum(p.num_crops for p in self.plans)
        if self.pixels.ndim != 4 or self.pixels.shape[0] != crops:
            raise ValueError(f"sample {self.id!r}: pixels {self.pixels.shape} but the plans need {crops} crops")
        if self.pixels.dtype != np.uint8:
            raise ValueError(f"sample {self.id!r}: pixels are {self.pixels.dtype}; crops are uint8 RGB (manager_jax.pixels)")

    @property
    def num_images(self) -> int:
        return len(self.plans)

    @property
    def num_crops(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def num_image_tokens(self) -> int:
        return sum(p.num_tokens for p in self.plans)

    @property
    def expanded_length(self) -> int:
        """Sequence length after each sentinel is replaced by its image's tokens."""
        return len(self.ids) - self.num_images + self.num_image_tokens


@dataclasses.dataclass(eq=False)
class Batch:
    """A fixed-shape batch: B rows of S tokens, C crops, T image tokens (docs/CONTRACTS.md §2).

    Attributes:
      input_ids: int32 [B, S] text ids. Image-token positions hold 0 (the model overwrites them
        with image features); padding holds the pad id.
      positions: int32 [B, S] RoPE positions, restarting at 0 for each packed segment; 0 on padding.
      segment_ids: int32 [B, S] 1, 2, ... for the samples of a row in order, 0 for padding.
        Attention never crosses segments.
      labels: int32 [B, S] unshifted; -100 = unsupervised (image tokens, prompts, padding).
        Position t predicts labels[t+1] when segment_ids[t] == segment_ids[t+1] != 0.
      pixel_values: uint8 [C, 384, 384, 3] RGB crops (NHWC) of every image of the batch, sample
        by sample, image by image; zeros after the real crops. `to_model_inputs` normalises them
        (manager_jax.pixels): the model takes float crops.
      crop_mask: bool [C] real crop.
      plan_src: int32 [T, 4] source indices into the batch's crop features flattened as
        crop * 729 + patch (up to 4 bilinear taps).
      plan_weight: float32 [T, 4] bilinear weights of the taps ((1, 0, 0, 0) without resize; 0 on
        newline and padding tokens).
      plan_newline: bool [T] token is the ``image_newline`` vector.
      plan_dst: int32 [T] flat destination row * S + position; B * S for padding tokens and for
        image tokens cut off by truncation (the scatter drops them).
      plan_manager: bool [T] token receives the Manager update (grid type main / all / grid).
      plan_image: int32 [T] batch-global image index of the token (images numbered sample by
        sample in order); -1 on padding.
      query_mask: bool [B, S] adaptive managers with an extra query (last / average / cross):
        the positions of each sample's extra query (SPEC §2.7, :func:`query_positions`).
      sample_ids: per row, the ids of the samples packed into it (segment 1, 2, ...).
    """

    input_ids: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray
    labels: np.ndarray
    pixel_values: np.ndarray
    crop_mask: np.ndarray
    plan_src: np.ndarray
    plan_weight: np.ndarray
    plan_newline: np.ndarray
    plan_dst: np.ndarray
    plan_manager: np.ndarray
    plan_image: np.ndarray
    query_mask: np.ndarray
    sample_ids: list[list[str]] = dataclasses.field(default_factory=list)

    ARRAY_FIELDS = (
        "input_ids", "positions", "segment_ids", "labels", "pixel_values", "crop_mask", "plan_src",
        "plan_weight", "plan_newline", "plan_dst", "plan_manager", "plan_image", "query_mask",
    )

    def to_model_inputs(self, pixel_dtype: Any = np.float32, pixels_out: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The array fields as a dict of numpy arrays (what the model's forward takes), the crops
        normalised into `pixel_dtype` (manager_jax.pixels), written into `pixels_out` when given
        (its slot in a step's stacked batch: no copy of the crops afterwards)."""
        out = self._arrays()
        out["pixel_values"] = normalize(self.pixel_values, pixel_dtype, out=pixels_out)
        return out

    def _arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in self.ARRAY_FIELDS}

    @property
    def shape(self) -> dict[str, int]:
        """B, S, C, T."""
        b, s = self.input_ids.shape
        return {"rows": b, "seq_len": s, "crops": int(self.crop_mask.shape[0]), "image_tokens": int(self.plan_dst.shape[0])}

    @property
    def num_samples(self) -> int:
        return sum(len(r) for r in self.sample_ids)

    def to_dict(self) -> dict[str, Any]:
        """Arrays (the crops as uint8) plus metadata as plain containers (crosses process
        boundaries cheaply)."""
        out: dict[str, Any] = self._arrays()
        out["sample_ids"] = [list(r) for r in self.sample_ids]
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Batch":
        return cls(**{name: np.asarray(d[name]) for name in cls.ARRAY_FIELDS}, sample_ids=[list(r) for r in d["sample_ids"]])


# ---------------------------------------------------------------------------------------------
# Expansion and the extra-query rule
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ExpandedSample:
    """A sample's sequence with each image sentinel replaced by its T image positions.

    ``length`` is the kept length (<= ``full_length``, the length before truncation).
    ``image_starts[k]`` is the expanded start of image k; image positions hold id 0 and label -100.
    """

    ids: np.ndarray
    labels: np.ndarray
    image_starts: np.ndarray
    image_lengths: np.ndarray
    full_length: int
    length: int

    @property
    def supervised_targets(self) -> int:
        """Positions the loss trains on: position t predicts labels[t + 1] (the first label never
        is a target), within the kept length."""
        return int((self.labels[1:] != IGNORE_INDEX).sum())


def expand_sample(ids: np.ndarray, labels: np.ndarray, image_lengths: Sequence[int], max_len: int | None = None) -> ExpandedSample:
    """Expand the image sentinels of ``ids`` (lengths ``image_lengths``), keep the first ``max_len``."""
    ids = np.asarray(ids, np.int64)
    labels = np.asarray(labels, np.int64)
    is_image = ids == IMAGE_TOKEN_INDEX
    image_lengths = np.asarray(image_lengths, np.int64).reshape(-1)
    if int(is_image.sum()) != len(image_lengths):
        raise ValueError(f"{int(is_image.sum())} image sentinels but {len(image_lengths)} image lengths")
    widths = np.ones(len(ids), np.int64)
    widths[is_image] = image_lengths
    starts = np.cumsum(widths) - widths
    full = int(widths.sum())
    out_ids = np.zeros(full, np.int32)
    out_labels = np.full(full, IGNORE_INDEX, np.int32)
    out_ids[starts[~is_image]] = ids[~is_image]
    out_labels[starts[~is_image]] = labels[~is_image]
    keep = full if max_len is None else min(full, max_len)
    return ExpandedSample(out_ids[:keep], out_labels[:keep], starts[is_image], image_lengths, full, keep)


def query_positions(
    ids: np.ndarray,
    image_lengths: Sequence[int],
    *,
    max_len: int | None = None,
    im_start_id: int = IM_START_TOKEN_ID,
    manager_lengths: Sequence[int] | None = None,
) -> np.ndarray:
    """Expanded positions (within the sample) of the adaptive Manager's extra query.

    ``ids`` are the unexpanded ids (with -200 sentinels), ``image_lengths`` the tokens of each image,
    ``manager_lengths`` the length of each image's Manager features (``image_length_list`` of the
    original: 729 for grid type "main", the grid part for "grid"; None = ``image_lengths``), which
    only the plain rule reads.
    Reproduces ``prepare_inputs_labels_for_multimodal`` (``llava_arch.py`` L613-690) and the
    injection loop (``modeling_qwen2.py`` L1082-1127). SPEC §2.5:

      "Chat prompts: q0 = position of the 2nd <|im_start|> (id 151644), i.e. the start of the user
      turn. q1 = (position of the 3rd <|im_start|>, or seq_len if there is none) − 2 + L_first_image;
      this equals the expanded index of the user-turn <|im_end|> plus 1. q2 = expanded index just
      after the first image's features. Plain prompts (no 2nd/3rd <|im_start|>):
      [−1, expanded_seq_len, L_last_image]."

    SPEC §2.7, with S the sequence length the sample sees (after truncation):

      "Plain: positions [q2, min(q1−1, S)): the caption tokens minus the final token.
      Chat, 1 image: positions [q0+3, s) minus its last element (text between "user\\n" and the
      image, minus the assumed "\\n"), plus [min(q2, S)+1, min(q1−1, S)) (text after "<image>\\n"
      up to but excluding <|im_end|>).
      Multi-image: [s_last+729+1, min(q1 + 729·(n−1) − n, S)).
      An empty query leaves extra_query = None."

    Multi-image uses the images' real lengths where the original assumes 729 (equal when every
    image has 729 tokens, the only case the original supports). Positions >= S are dropped (the
    original would index out of range there). Returns int64 positions, ascending; empty for
    text-only samples and empty queries.
    """
    ids = np.asarray(ids)
    lengths = [int(x) for x in np.asarray(image_lengths).reshape(-1)]
    sentinels = np.flatnonzero(ids == IMAGE_TOKEN_INDEX)
    n = len(sentinels)
    if n == 0:
        return np.zeros(0, np.int64)
    if n != len(lengths):
        raise ValueError(f"{n} image sentinels but {len(lengths)} image lengths")
    expanded_len = len(ids) - n + sum(lengths)
    seq = expanded_len if max_len is None else min(max_len, expanded_len)
    starts = [int(sentinels[k]) + sum(lengths[:k]) - k for k in range(n)]  # expanded image starts

    im_starts = np.flatnonzero(ids == im_start_id)[1:3].tolist()
    plain = len(im_starts) == 0
    if plain:
        q2 = lengths[-1] if manager_lengths is None else int(np.asarray(manager_lengths).reshape(-1)[-1])
        q0, q1 = -1, expanded_len
    else:
        third = im_starts[1] if len(im_starts) > 1 else len(ids)
        q0, q1, q2 = im_starts[0], third - 2 + lengths[0], starts[0] + lengths[0]

    if n > 1:
        first = starts[-1] + lengths[-1] + 1
        last = min(q1 + sum(lengths[1:]) - n, seq)
        positions = list(range(first, last))
    elif plain:
        positions = list(range(q2, min(q1 - 1, seq)))
    else:
        positions = list(range(q0 + 3, starts[0]))[:-1]  # drop the assumed "\n" before the image
        positions += range(min(q2, seq) + 1, min(q1 - 1, seq))
    out = np.asarray(positions, np.int64)
    return out[(out >= 0) & (out < seq)]


# ---------------------------------------------------------------------------------------------
# Assembly
# ---------------------------------------------------------------------------------------------


def assemble_batch(
    samples: Sequence[ProcessedSample],
    *,
    rows: int,
    seq_len: int,
    max_crops: int,
    max_image_tokens: int,
    pack: bool,
    grid_type: str | None,
    query_type: str | None,
    truncate: bool | None = None,
    pad_id: int = 0,
    im_start_id: int = IM_START_TOKEN_ID,
    crop_size: int = multigrid.PATCH,
) -> Batch:
    """Expand, truncate, pack and pad ``samples`` into one :class:`Batch` of fixed shapes.

    Args:
      samples: processed samples, in order (packing is first fit in this order).
      rows, seq_len, max_crops, max_image_tokens: the shapes B, S, C, T.
      pack: first-fit several samples per row (segment ids, per-segment positions); False puts
        sample i alone in row i, right-padded (the original's layout, for parity tests).
      grid_type: Manager grid type ("main" / "grid" / "all") for ``plan_manager``; None when the
        model has no Manager (``plan_manager`` all False).
      query_type: the adaptive Manager's query type; ``query_mask`` is filled only for
        "last" / "average" / "cross".
      truncate: cut samples longer than S after expansion (parity mode). Defaults to ``not pack``;
        otherwise a too-long sample raises (the pipeline skips those beforehand).
      pad_id: id written on padding positions.
      im_start_id: ``<|im_start|>`` id for the query rule.

    Raises :class:`BatchShapeError` when the samples do not fit the shapes.
    """
    if truncate is None:
        truncate = not pack
    expanded = []
    for sample in samples:
        exp = expand_sample(sample.ids, sample.labels, [p.num_tokens for p in sample.plans], seq_len if truncate else None)
        if exp.length > seq_len:
            raise BatchShapeError(
                f"sample {sample.id!r} has {exp.length} tokens after image expansion > seq_len {seq_len}; "
                + ("packed mode never cuts a sample (skip it, or pass truncate=True)" if pack else "pass truncate=True to cut it")
            )
        expanded.append(exp)
    row_of = first_fit_rows([e.length for e in expanded], rows=rows, seq_len=seq_len, pack=pack)

    total_crops = sum(s.num_crops for s in samples)
    total_tokens = sum(s.num_image_tokens for s in samples)
    if total_crops > max_crops:
        raise BatchShapeError(f"the samples have {total_crops} crops > max_crops {max_crops}")
    if total_tokens > max_image_tokens:
        raise BatchShapeError(f"the samples have {total_tokens} image tokens > max_image_tokens {max_image_tokens}")

    input_ids = np.full((rows, seq_len), pad_id, np.int32)
    positions = np.zeros((rows, seq_len), np.int32)
    segment_ids = np.zeros((rows, seq_len), np.int32)
    labels = np.full((rows, seq_len), IGNORE_INDEX, np.int32)
    pixel_values = np.zeros((max_crops, crop_size, crop_size, 3), np.uint8)
    crop_mask = np.zeros(max_crops, bool)
    plan_src = np.zeros((max_image_tokens, 4), np.int32)
    plan_weight = np.zeros((max_image_tokens, 4), np.float32)
    plan_newline = np.zeros(max_image_tokens, bool)
    plan_dst = np.full(max_image_tokens, rows * seq_len, np.int32)
    plan_manager = np.zeros(max_image_tokens, bool)
    plan_image = np.full(max_image_tokens, -1, np.int32)
    query_mask = np.zeros((rows, seq_len), bool)
    sample_ids: list[list[str]] = [[] for _ in range(rows)]

    row_fill = [0] * rows
    crop_offset = token_offset = image_index = 0
    for sample, exp, row in zip(samples, expanded, row_of):
        start, length = row_fill[row], exp.length
        row_fill[row] += length
        sample_ids[row].append(str(sample.id))
        segment = len(sample_ids[row])
        input_ids[row, start : start + length] = exp.ids
        labels[row, start : start + length] = exp.labels
        positions[row, start : start + length] = np.arange(length, dtype=np.int32)
        segment_ids[row, start : start + length] = segment
        if query_type in ADAPTIVE_QUERY_TYPES:
            # Manager feature lengths (multi_image=True: a lone single-crop image has its 729 even
            # for "grid", where our token mask leaves its update out).
            mlen = None if grid_type is None else [
                int(multigrid.manager_token_mask(p, grid_type, True).sum()) for p in sample.plans]
            query = query_positions(sample.ids, exp.image_lengths, max_len=length, im_start_id=im_start_id,
                                    manager_lengths=mlen)
            query_mask[row, start + query] = True

        if sample.num_crops:
            if sample.pixels.shape[1:] != (crop_size, crop_size, 3):
                raise BatchShapeError(f"sample {sample.id!r}: crops {sample.pixels.shape[1:]} != ({crop_size}, {crop_size}, 3)")
            pixel_values[crop_offset : crop_offset + sample.num_crops] = sample.pixels
            crop_mask[crop_offset : crop_offset + sample.num_crops] = True
        for plan, image_start in zip(sample.plans, exp.image_starts):
            t = plan.num_tokens
            span = slice(token_offset, token_offset + t)
            plan_src[span] = plan.src + crop_offset * PATCHES_PER_CROP
            plan_weight[span] = plan.weight
            plan_newline[span] = plan.newline
            pos = int(image_start) + np.arange(t)
            plan_dst[span] = np.where(pos < length, row * seq_len + start + pos, rows * seq_len)
            if grid_type is not None:
                plan_manager[span] = multigrid.manager_token_mask(plan, grid_type, len(sample.plans) > 1)
            plan_image[span] = image_index
            token_offset += t
            crop_offset += plan.num_crops
            image_index += 1

    return Batch(
        input_ids=input_ids,
        positions=positions,
        segment_ids=segment_ids,
        labels=labels,
        pixel_values=pixel_values,
        crop_mask=crop_mask,
        plan_src=plan_src,
        plan_weight=plan_weight,
        plan_newline=plan_newline,
        plan_dst=plan_dst,
        plan_manager=plan_manager,
        plan_image=plan_image,
        query_mask=query_mask,
        sample_ids=sample_ids,
    )
