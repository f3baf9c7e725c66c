"""Pixel side of the multi-grid preprocessing: RGB conversion, crops, normalisation.

The geometry (best resolution, resize size, paste offset) lives in :mod:`manager_jax.multigrid`;
this module applies it with PIL exactly as ``LLaVA-NeXT/llava/mm_utils.py`` and
``SigLipImageProcessor`` do (SPEC §3.1-§3.5). Crops are returned NHWC, uint8: the normalisation
(rescale, mean and std) is applied by the vision tower (:mod:`manager_jax.pixels`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from manager_jax import multigrid

PAD_COLOR = (127, 127, 127)  # int(0.5 * 255) for each channel: pad-to-square background


def load_rgb(image: Image.Image, convention: str = "original") -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB, as the reference of ``convention`` does.

    ``"original"``: PIL's own conversion (``Image.open(...).convert("RGB")``): alpha is dropped
    (not composited), palettes are expanded, CMYK/YCbCr/LAB/HSV go through PIL's converters.
    ``"hf"``: an image with an alpha band or a transparency entry is laid over white first, as
    transformers' image processors do; any other image is converted as above.

    High bit-depth modes (``I;16*``, ``I``, ``F``) are converted by PIL too, which clips to
    0..255 instead of scaling (a full-range 16-bit image comes out nearly white): both
    references do exactly that, and the released models saw such images that way.
    Modes PIL cannot convert to RGB directly go through RGBA or LA (e.g. premultiplied ``La``).
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"load_rgb expects a PIL.Image.Image, got {type(image).__name__}")
    if convention not in multigrid.CONVENTIONS:
        raise ValueError(f"convention must be one of {multigrid.CONVENTIONS}, got {convention!r}")
    # Before the RGB shortcut: an RGB PNG can carry a transparent colour (tRNS) too.
    if convention == "hf" and ("A" in image.getbands() or image.info.get("transparency") is not None):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError:
        pass
    for via in ("RGBA", "LA"):  # e.g. premultiplied "La" only converts to "LA"
        try:
            return image.convert(via).convert("RGB")
        except ValueError:
            continue
    raise ValueError(f"cannot convert a PIL image of mode {image.mode!r} to RGB")


def expand_to_square(image: Image.Image, background: tuple[int, int, int] = PAD_COLOR) -> Image.Image:
    """Centre the image on a square of its longer side (``expand2square``, SPEC §3.2)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


def image_crops(
    image: Image.Image,
    *,
    mode: str,
    pinpoints: str | Sequence[Sequence[int]] | None = None,
    patch: int = multigrid.PATCH,
    convention: str = "original",
    max_tiles: int | None = None,
) -> list[Image.Image]:
    """The crops of one image, each ``patch`` x ``patch`` RGB (SPEC §3.2, §3.5).

    - square: the whole image squashed to ``patch``² (bicubic).
    - pad: centred on a (127, 127, 127) square, then resized to ``patch``² (bicubic).
    - anyres / anyres_max_N: [base, tile_0, ...]; base = the image squashed to ``patch``²;
      tiles = the image resized keeping its aspect ratio (``Image.resize`` default, bicubic)
      into the best pinpoint canvas, pasted on black at the centre, cut row-major.

    ``convention`` and ``max_tiles`` select the canvas as :func:`multigrid.plan_image` does, so
    crops and plan agree.
    """
    rgb = load_rgb(image, convention)
    kind, _ = multigrid.parse_mode(mode)
    square = (patch, patch)
    if kind == "square":
        return [rgb.resize(square, Image.Resampling.BICUBIC)]
    if kind == "pad":
        return [expand_to_square(rgb).resize(square, Image.Resampling.BICUBIC)]
    if pinpoints is None:
        raise ValueError(f"mode {mode!r} needs image_grid_pinpoints")
    canvas_w, canvas_h = multigrid.best_resolution(
        rgb.size, pinpoints, convention=convention, max_tiles=max_tiles, patch=patch
    )
    new_w, new_h, paste_x, paste_y = multigrid.resize_geometry(rgb.size, (canvas_w, canvas_h))
    canvas = Image.new("RGB", (canvas_w, canvas_h), (0, 0, 0))
    canvas.paste(rgb.resize((new_w, new_h), Image.Resampling.BICUBIC), (paste_x, paste_y))
    tiles = [
        canvas.crop((x, y, x + patch, y + patch))
        for y in range(0, canvas_h, patch)
        for x in range(0, canvas_w, patch)
    ]
    return [rgb.resize(square, Image.Resampling.BICUBIC)] + tiles


def crop_pixels(crops: Sequence[Image.Image], size: int = multigrid.PATCH) -> np.ndarray:
    """Crops -> uint8 [n, size, size, 3] (NHWC): RGB conversion and, when needed, the bicubic
    resize to ``size``² of ``SigLipImageProcessor`` (SPEC §3.1). Its rescale and normalisation
    are `manager_jax.pixels.normalize` (on the device: `tower_input`)."""
    if len(crops) == 0:
        raise ValueError("crop_pixels needs at least one crop")
    arrays = []
    for crop in crops:
        rgb = load_rgb(crop)
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(rgb, dtype=np.uint8))
    return np.stack(arrays)


def preprocess_image(
    image: Image.Image,
    *,
    mode: str,
    pinpoints: str | Sequence[Sequence[int]] | None = None,
    convention: str = "original",
    grid_type: str | None = None,
    unpad: bool = True,
    max_tiles: int | None = None,
    patch: int = multigrid.PATCH,
    grid_tokens: int = multigrid.GRID_TOKENS,
) -> tuple[np.ndarray, multigrid.ImagePlan]:
    """One image -> (pixels uint8 [num_crops, patch, patch, 3], its :class:`ImagePlan`).

    ``grid_type`` (Manager "main"/"grid"/"all"), when given, fills ``plan.manager``.
    """
    rgb = load_rgb(image, convention)
    # Plan first: it raises clear errors before any pixel work.
    plan = multigrid.plan_image(
        rgb.size,
        mode=mode,
        pinpoints=pinpoints,
        convention=convention,
        max_tiles=max_tiles,
        patch=patch,
        grid_tokens=grid_tokens,
        unpad=unpad,
        grid_type=grid_type,
    )
    crops = image_crops(rgb, mode=mode, pinpoints=pinpoints, patch=patch, convention=convention, max_tiles=max_tiles)
    pixels = crop_pixels(crops, size=patch)
    if pixels.shape[0] != plan.num_crops:  # geometry and pixels come from the same functions
        raise AssertionError(f"{pixels.shape[0]} crops but the plan expects {plan.num_crops}")
    return pixels, plan
