"""Multi-grid ("anyres", "anyres_max_N") geometry and the per-image token plan.

Pure numpy, no PIL and no jax: this module decides, for one image of size (W, H), which crops
are encoded and which crop features (with which bilinear weights) end up at each image-token
position of the language model's sequence (SPEC §3, docs/CONTRACTS.md §1).

Two conventions are supported:

- ``"original"``: LLaVA-NeXT / LLaVA-OV-Manager (``llava_arch.py``, ``mm_utils.py``). Pinpoint
  pairs are (width, height); unpad truncates with ``int()``; the ``anyres_max_N`` downsampling
  only applies to ``anyres_max_N`` modes; single-crop images get no newline token.
- ``"hf"``: transformers 5.x ``LlavaOnevision*``. Pinpoint pairs are (height, width) (same set,
  transposed iteration order, which only matters for ties); unpad rounds with
  ``int(round(x, 7))``; the max-N rule always applies (plain ``anyres`` uses N = 9, the
  ``vision_aspect_ratio`` default); single-crop images get one trailing newline token.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import re
from collections.abc import Sequence

import numpy as np

PATCH = 384  # crop side in pixels
GRID_TOKENS = 27  # SigLIP so400m/14 at 384: 27 x 27 patch tokens per crop
HF_DEFAULT_MAX_PATCHES = 9  # transformers' vision_aspect_ratio default "anyres_max_9"
MAX_TIMES_THRESHOLD = 1.1  # downsample only when times > 1.1 (strict), llava_arch.py L494

CONVENTIONS = ("original", "hf")
GRID_TYPES = ("main", "grid", "all")

_MODE_MAX_RE = re.compile(r"anyres_max_(\d+)")
_PINPOINT_RANGE_RE = re.compile(r"\((\d+)x(\d+)\)")


# --------------------------------------------------------------------------------------------
# Pinpoints and best resolution
# --------------------------------------------------------------------------------------------


def parse_pinpoints(spec: str | Sequence[Sequence[int]], patch: int = PATCH) -> list[tuple[int, int]]:
    """Parse ``image_grid_pinpoints`` into a list of integer pairs, in the order given.

    Accepted forms (SPEC §3.3):
    - the range string ``"(1x1),...,(6x6)"``: the first and last ``(axb)`` pairs span the range,
      expanded as ``[(i, j) for i in a0..a1 for j in b0..b1]`` times ``patch``;
    - a literal list string such as ``"[[384, 768], [768, 384]]"`` (``ast.literal_eval``);
    - a Python list/tuple of pairs.

    The pairs are returned unchanged: (width, height) in the original convention, (height, width)
    in transformers' one; :func:`candidate_resolutions` applies the convention.
    """
    if isinstance(spec, str):
        if "x" in spec:
            matches = _PINPOINT_RANGE_RE.findall(spec)
            if not matches:
                raise ValueError(f"pinpoint range string {spec!r} holds no '(AxB)' pair")
            (a0, b0), (a1, b1) = (tuple(map(int, matches[0])), tuple(map(int, matches[-1])))
            if a0 < 1 or b0 < 1 or a1 < a0 or b1 < b0:
                raise ValueError(f"pinpoint range {spec!r} is empty or not positive")
            pairs: list = [(i * patch, j * patch) for i in range(a0, a1 + 1) for j in range(b0, b1 + 1)]
        else:
            try:
                pairs = ast.literal_eval(spec)
            except (ValueError, SyntaxError) as exc:
                raise ValueError(f"cannot parse pinpoints string {spec!r}: {exc}") from exc
    else:
        pairs = spec
    if not isinstance(pairs, (list, tuple)) or len(pairs) == 0:
        raise ValueError(f"pinpoints must be a non-empty list of (a, b) pairs, got {spec!r}")
    out = []
    for pair in pairs:
        if (
            not isinstance(pair, (list, tuple))
            or len(pair) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in pair)
            or min(pair) < 1
        ):
            raise ValueError(f"pinpoint {pair!r} is not a pair of positive integers (in {spec!r})")
        out.append((int(pair[0]), int(pair[1])))
    return out


def candidate_resolutions(
    pinpoints: str | Sequence[Sequence[int]],
    *,
    convention: str = "original",
    max_tiles: int | None = None,
    patch: int = PATCH,
) -> list[tuple[int, int]]:
    """Candidate canvas sizes as (width, height), in the iteration order of ``convention``.

    ``max_tiles`` (not in the original) drops candidates with more than that many
    ``patch`` x ``patch`` tiles, to bound the number of crops per image.
    """
    _check_convention(convention)
    pairs = parse_pinpoints(pinpoints, patch)
    # transformers reads each pair as (height, width); the original as (width, height).
    cands = [(b, a) for a, b in pairs] if convention == "hf" else pairs
    for w, h in cands:
        if w % patch or h % patch:
            raise ValueError(f"pinpoint {(w, h)} is not a multiple of the crop size {patch}")
    if max_tiles is not None:
        if max_tiles < 1:
            raise ValueError(f"max_tiles must be >= 1, got {max_tiles}")
        cands = [(w, h) for w, h in cands if (w // patch) * (h // patch) <= max_tiles]
        if not cands:
            raise ValueError(f"no pinpoint has at most {max_tiles} tiles of {patch}px")
    return cands


def select_best_resolution(image_size: tuple[int, int], candidates: Sequence[Sequence[int]]) -> tuple[int, int]:
    """Pick the candidate (w, h) for an image of size (W, H) exactly as ``mm_utils.py`` does.

    Maximise the effective resolution ``min(int(W*s) * int(H*s), W*H)`` with
    ``s = min(w/W, h/H)``, then minimise the waste ``w*h - effective``; comparisons are strict, so
    the first candidate wins a tie (SPEC §3.4).
    """
    width, height = _check_size(image_size)
    best = None
    best_eff, best_waste = 0, float("inf")
    for w, h in candidates:
        scale = min(w / width, h / height)
        eff = min(int(width * scale) * int(height * scale), width * height)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(w), int(h)), eff, waste
    if best is None:
        raise ValueError("select_best_resolution needs at least one candidate")
    return best


def best_resolution(
    image_size: tuple[int, int],
    pinpoints: str | Sequence[Sequence[int]],
    *,
    convention: str = "original",
    max_tiles: int | None = None,
    patch: int = PATCH,
) -> tuple[int, int]:
    """The anyres canvas (w*, h*) for an image (W, H): pinpoints parsed, convention applied."""
    return select_best_resolution(
        image_size, candidate_resolutions(pinpoints, convention=convention, max_tiles=max_tiles, patch=patch)
    )


def resize_geometry(image_size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int, int, int]:
    """Aspect-preserving resize of (W, H) into the canvas ``target`` = (w*, h*) (SPEC §3.5).

    Returns ``(new_w, new_h, paste_x, paste_y)``: the resized image size and the offset at which
    it is pasted on the black canvas (``mm_utils.resize_and_pad_image``).
    """
    width, height = _check_size(image_size)
    tw, th = _check_size(target)
    scale_w, scale_h = tw / width, th / height
    if scale_w < scale_h:
        new_w, new_h = tw, min(math.ceil(height * scale_w), th)
    else:
        new_h, new_w = th, min(math.ceil(width * scale_h), tw)
    return new_w, new_h, (tw - new_w) // 2, (th - new_h) // 2


# --------------------------------------------------------------------------------------------
# Unpad and downsampling
# --------------------------------------------------------------------------------------------


def unpad_bounds(
    image_size: tuple[int, int], map_size: tuple[int, int], convention: str = "original"
) -> tuple[int, int, int, int]:
    """Rows/columns of a (rows, cols) feature map that survive unpadding (SPEC §3.6).

    ``image_size`` is (W, H). Returns ``(row_start, row_stop, col_start, col_stop)``. The
    original truncates the unpadded length with ``int()``; transformers uses
    ``int(round(x, 7))``. When the padding difference is odd one extra row/column survives.
    """
    _check_convention(convention)
    width, height = _check_size(image_size)
    rows, cols = _check_size(map_size)
    to_int = int if convention == "original" else (lambda x: int(round(x, 7)))
    # Same float expressions, in the same order, as unpad_image in both code bases.
    if width / height > cols / rows:
        new_h = to_int(height * (cols / width))
        pad = (rows - new_h) // 2
        return pad, rows - pad, 0, cols
    new_w = to_int(width * (rows / height))
    pad = (cols - new_w) // 2
    return 0, rows, pad, cols - pad


def unpadded_size(
    image_size: tuple[int, int], map_size: tuple[int, int], convention: str = "original"
) -> tuple[int, int]:
    """(height, width) of the feature map after unpadding; see :func:`unpad_bounds`."""
    r0, r1, c0, c1 = unpad_bounds(image_size, map_size, convention)
    return r1 - r0, c1 - c0


def max_patches_target(height: int, width: int, max_patches: int, grid_tokens: int = GRID_TOKENS) -> tuple[int, int]:
    """Size after the ``anyres_max_N`` rule (SPEC §3.7).

    ``times = sqrt(h*w / (N * grid_tokens**2))``; if ``times > 1.1`` (strict) the map is resized
    to ``(int(h // times), int(w // times))``, else it is kept.
    """
    if max_patches < 1:
        raise ValueError(f"max_patches must be >= 1, got {max_patches}")
    times = math.sqrt(height * width / (max_patches * grid_tokens**2))
    if times > MAX_TIMES_THRESHOLD:
        return int(height // times), int(width // times)
    return height, width


def bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """1-D taps of ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``.

    Returns ``(i0, i1, w0, w1)`` for each output index: ``out[d] = w0*in[i0] + w1*in[i1]``.
    Mirrors torch's kernel, in float32 like its opmath: ``scale = in/out``,
    ``src = max((d + 0.5) * scale - 0.5, 0)`` (fused multiply-add), ``i0 = min(floor(src), in-1)``,
    ``i1 = i0 + (i0 < in-1)``, ``w1 = src - i0``; equal sizes copy (no antialias).
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"bilinear sizes must be >= 1, got in={in_size}, out={out_size}")
    dst = np.arange(out_size)
    if in_size == out_size:
        return dst, dst.copy(), np.ones(out_size, np.float32), np.zeros(out_size, np.float32)
    scale = np.float32(in_size) / np.float32(out_size)  # float32, like torch's opmath for float
    # torch's compiled kernels evaluate scale * (d + 0.5) - 0.5 as one fused multiply-add: the
    # float64 product of a float32 scale and a half-integer is exact, so one rounding to float32
    # reproduces the FMA bit for bit (a plain float32 product is off by up to 4e-6).
    src = (np.float64(scale) * (dst + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    w1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    i1 = i0 + (i0 < in_size - 1)
    return i0, i1, (np.float32(1) - w1).astype(np.float32), w1


# --------------------------------------------------------------------------------------------
# Token plan
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class ImagePlan:
    """Where each image token of one image comes from (docs/CONTRACTS.md §1).

    ``src`` indexes this image's crop features flattened as ``crop * grid_tokens**2 + patch``.
    Rows of ``weight`` sum to 1 for feature tokens ((1, 0, 0, 0) where nothing is resized, the
    unused taps repeating the first index); newline rows have src 0 and weight 0, so a plain
    weighted gather yields zero there and ``newline`` says where to put ``image_newline``.
    """

    num_crops: int
    grid: tuple[int, int] | None  # (nw, nh) tiles across / down; None for single-crop modes
    src: np.ndarray  # int32 [T, 4]
    weight: np.ndarray  # float32 [T, 4]
    newline: np.ndarray  # bool [T]
    is_base: np.ndarray  # bool [T]
    image_size: tuple[int, int] = (0, 0)  # (W, H) of the source image
    canvas: tuple[int, int] | None = None  # anyres canvas (w*, h*)
    grid_map: tuple[int, int] | None = None  # (h', w') of the grid part, newline column excluded
    manager: np.ndarray | None = None  # bool [T], filled when plan_image gets a grid_type
    # mm_patch_merge_type "flat" with several crops: every crop's tokens in crop order, and the
    # Manager features flattened the same way (so they cover every token whatever the grid type).
    flat: bool = False

    @property
    def num_tokens(self) -> int:
        """T, the number of sequence positions this image occupies."""
        return int(self.src.shape[0])


def parse_mode(mode: str) -> tuple[str, int | None]:
    """Split an ``image_aspect_ratio`` string into (kind, N): kind in square/pad/anyres."""
    if mode in ("square", "pad", "anyres"):
        return mode, None
    match = _MODE_MAX_RE.fullmatch(mode) if isinstance(mode, str) else None
    if match is None:
        raise ValueError(f"unsupported image mode {mode!r}: expected square, pad, anyres or anyres_max_<N>")
    n = int(match.group(1))
    if n < 1:
        raise ValueError(f"anyres_max_N needs N >= 1, got {mode!r}")
    return "anyres", n


def plan_image(
    image_size: tuple[int, int],
    *,
    mode: str,
    pinpoints: str | Sequence[Sequence[int]] | None = None,
    convention: str = "original",
    max_tiles: int | None = None,
    patch: int = PATCH,
    grid_tokens: int = GRID_TOKENS,
    unpad: bool = True,
    grid_type: str | None = None,
) -> ImagePlan:
    """Token plan for one image of size (W, H) (SPEC §3.2-§3.8, §3.9 #1-#4).

    Args:
      image_size: PIL ``.size``, i.e. (width, height).
      mode: "square", "pad", "anyres" or "anyres_max_N" (``image_aspect_ratio``).
      pinpoints: ``image_grid_pinpoints`` (any form :func:`parse_pinpoints` takes); required for
        anyres modes.
      convention: "original" or "hf" (see the module docstring).
      max_tiles: optional cap on the tiles per image (filters the pinpoints; not in the original).
      patch: crop side in pixels; grid_tokens: patch tokens per crop side.
      unpad: whether ``mm_patch_merge_type`` contains "unpad" (the max-N rule and the newline
        need it). Without it ("flat") an anyres image is every crop's tokens in crop order.
      grid_type: if given ("main"/"grid"/"all"), ``plan.manager`` holds
        :func:`manager_token_mask`.

    Token order: base crop (``grid_tokens**2`` tokens) first, then the grid map row by row, each
    row ending with a newline token.
    """
    _check_convention(convention)
    _check_size(image_size)
    kind, max_n = parse_mode(mode)
    base_len = grid_tokens * grid_tokens
    base_idx = np.arange(base_len, dtype=np.int32)

    if kind in ("square", "pad"):
        # One crop, its tokens in raster order; transformers appends one newline (SPEC §3.9 #4).
        n_tok = base_len + (1 if convention == "hf" else 0)
        src = np.zeros((n_tok, 4), np.int32)
        src[:base_len] = base_idx[:, None]
        weight = np.zeros((n_tok, 4), np.float32)
        weight[:base_len, 0] = 1
        newline = np.zeros(n_tok, bool)
        newline[base_len:] = True
        is_base = ~newline
        plan = ImagePlan(1, None, src, weight, newline, is_base, image_size=tuple(image_size))
        return _with_manager(plan, grid_type)

    if pinpoints is None:
        raise ValueError(f"mode {mode!r} needs image_grid_pinpoints")
    if not unpad:
        return _flat_plan(image_size, pinpoints, convention, max_tiles, patch, grid_tokens, grid_type)
    if convention == "hf" and max_n is None:
        max_n = HF_DEFAULT_MAX_PATCHES  # transformers applies the max-N rule always (SPEC §3.9 #3)

    canvas = best_resolution(image_size, pinpoints, convention=convention, max_tiles=max_tiles, patch=patch)
    nw, nh = canvas[0] // patch, canvas[1] // patch
    rows, cols = grid_tokens * nh, grid_tokens * nw
    r0, r1, c0, c1 = unpad_bounds(image_size, (rows, cols), convention)
    h, w = r1 - r0, c1 - c0
    out_h, out_w = (h, w) if (max_n is None or h * w == 0) else max_patches_target(h, w, max_n, grid_tokens)

    # Taps along each axis in unpadded-map coordinates, then shifted into the full map.
    if out_h * out_w:
        yi0, yi1, yw0, yw1 = bilinear_taps(h, out_h)
        xi0, xi1, xw0, xw1 = bilinear_taps(w, out_w)
    else:  # degenerate empty map: no grid tokens, only (zero) rows
        yi0 = yi1 = np.zeros(out_h, np.int64)
        xi0 = xi1 = np.zeros(out_w, np.int64)
        yw0 = yw1 = np.zeros(out_h, np.float32)
        xw0 = xw1 = np.zeros(out_w, np.float32)

    def flat_index(r: np.ndarray, c: np.ndarray) -> np.ndarray:
        # Map position (r, c) of the [27*nh, 27*nw] map -> crop (1 + tile) and patch within it.
        r = r + r0
        c = c + c0
        crop = 1 + (r // grid_tokens) * nw + (c // grid_tokens)
        return crop * base_len + (r % grid_tokens) * grid_tokens + (c % grid_tokens)

    ry0, ry1 = yi0[:, None], yi1[:, None]
    cx0, cx1 = xi0[None, :], xi1[None, :]
    g_src = np.stack(
        [flat_index(ry0, cx0), flat_index(ry0, cx1), flat_index(ry1, cx0), flat_index(ry1, cx1)], axis=-1
    )  # [out_h, out_w, 4]
    g_w = np.stack(
        [
            yw0[:, None] * xw0[None, :],
            yw0[:, None] * xw1[None, :],
            yw1[:, None] * xw0[None, :],
            yw1[:, None] * xw1[None, :],
        ],
        axis=-1,
    ).astype(np.float32)
    if (out_h, out_w) == (h, w):
        # No resize: taps collapse to the exact source token with weight (1, 0, 0, 0).
        g_src[..., 1:] = g_src[..., :1]
        g_w[...] = 0
        g_w[..., 0] = 1

    # Append the newline column: src 0, weight 0, newline True.
    row_src = np.zeros((out_h, out_w + 1, 4), np.int32)
    row_src[:, :out_w] = g_src
    row_w = np.zeros((out_h, out_w + 1, 4), np.float32)
    row_w[:, :out_w] = g_w
    row_nl = np.zeros((out_h, out_w + 1), bool)
    row_nl[:, out_w] = True

    n_grid = out_h * (out_w + 1)
    src = np.concatenate([np.repeat(base_idx[:, None], 4, axis=1), row_src.reshape(n_grid, 4)])
    weight = np.concatenate([np.tile(np.array([[1, 0, 0, 0]], np.float32), (base_len, 1)), row_w.reshape(n_grid, 4)])
    newline = np.concatenate([np.zeros(base_len, bool), row_nl.reshape(n_grid)])
    is_base = np.concatenate([np.ones(base_len, bool), np.zeros(n_grid, bool)])
    plan = ImagePlan(
        num_crops=1 + nw * nh,
        grid=(nw, nh),
        src=src.astype(np.int32),
        weight=weight,
        newline=newline,
        is_base=is_base,
        image_size=tuple(image_size),
        canvas=canvas,
        grid_map=(out_h, out_w),
    )
    return _with_manager(plan, grid_type)


def manager_token_mask(plan: ImagePlan, grid_type: str, multi_image: bool = False) -> np.ndarray:
    """bool [T]: which of the image's tokens receive the Manager update (SPEC §2.4, §2.6).

    Multi-crop images: "all" -> every token (base, grid and newlines, position-aligned with the
    main features); "main" -> the base crop's tokens; "grid" -> the grid part, newlines included
    (the original skips the base via ``image_feature_offset = 729``).

    Single-crop images: the feature tokens (never a trailing transformers newline) for "main" and
    "all", and for "grid" in a sample of several images (`multi_image`: that branch of the original
    uses no offset). For "grid" on a sample's only image the original still adds the 729 offset, so
    it would write a 729-token update into the text that follows the image (a bug); we return
    all-False instead.
    """
    if grid_type not in GRID_TYPES:
        raise ValueError(f"grid_type must be one of {GRID_TYPES}, got {grid_type!r}")
    if plan.flat:
        if grid_type == "grid":
            raise ValueError(FLAT_GRID_ERROR)
        return np.ones(plan.num_tokens, bool)
    if plan.num_crops == 1:
        if grid_type == "grid" and not multi_image:
            return np.zeros(plan.num_tokens, bool)
        return plan.is_base & ~plan.newline
    if grid_type == "all":
        return np.ones(plan.num_tokens, bool)
    if grid_type == "main":
        return plan.is_base.copy()
    return ~plan.is_base


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


# The original's flat branch flattens all crops' Manager features but still offsets a "grid"
# Manager by 729 tokens: its update would land 729 tokens late, partly on the text after the image.
FLAT_GRID_ERROR = ("manager grid_type 'grid' with mm_patch_merge_type 'flat' and anyres tiling: the original shifts "
                   "the Manager update 729 tokens past the image's; use grid_type 'all' or 'main' (the same there: "
                   "every token) or mm_patch_merge_type 'spatial_unpad'")


def _flat_plan(image_size, pinpoints, convention, max_tiles, patch, grid_tokens, grid_type) -> ImagePlan:
    """An anyres image under mm_patch_merge_type "flat" (llava_arch.py's flat branch): base crop and
    grid crops, each crop's tokens in raster order, no unpad, no resize, no newline."""
    canvas = best_resolution(image_size, pinpoints, convention=convention, max_tiles=max_tiles, patch=patch)
    nw, nh = canvas[0] // patch, canvas[1] // patch
    num_crops = 1 + nw * nh
    n_tok = num_crops * grid_tokens * grid_tokens
    weight = np.zeros((n_tok, 4), np.float32)
    weight[:, 0] = 1
    is_base = np.zeros(n_tok, bool)
    is_base[: grid_tokens * grid_tokens] = True
    plan = ImagePlan(num_crops, (nw, nh), np.repeat(np.arange(n_tok, dtype=np.int32)[:, None], 4, axis=1), weight,
                     np.zeros(n_tok, bool), is_base, image_size=tuple(image_size), canvas=canvas, flat=True)
    return _with_manager(plan, grid_type)


def _with_manager(plan: ImagePlan, grid_type: str | None) -> ImagePlan:
    if grid_type is None:
        return plan
    return dataclasses.replace(plan, manager=manager_token_mask(plan, grid_type))


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")


def _check_size(size: Sequence[int]) -> tuple[int, int]:
    try:
        a, b = size
    except (TypeError, ValueError):
        raise ValueError(f"expected a (width, height) pair, got {size!r}") from None
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (a, b)) or a < 1 or b < 1:
        raise ValueError(f"sizes must be positive integers, got {size!r}")
    return int(a), int(b)
