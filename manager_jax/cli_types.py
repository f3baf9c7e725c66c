"""argparse types shared by the commands: a bad value is a usage error (exit 2) naming the flag,
found before anything is loaded or computed."""

from __future__ import annotations

import argparse
import math

# The side of a generated test image: the anyres grids stop at 6 x 384 pixels, so a larger image
# only tests a resize, and 100000x100000 (30 GB of pixels) ran out of memory with a traceback.
MAX_IMAGE_SIDE = 16384


def image_size(text: str) -> tuple[int, int]:
    """'WxH' -> (W, H), each side in [1, MAX_IMAGE_SIDE]."""
    w, sep, h = text.strip().lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit() or not (1 <= int(w) <= MAX_IMAGE_SIDE and 1 <= int(h) <= MAX_IMAGE_SIDE):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT like 768x768, each side 1..{MAX_IMAGE_SIDE}, "
                                         f"got {text!r}")
    return int(w), int(h)


def seed(text: str) -> int:
    """A seed of numpy's and JAX's generators: an integer in [0, 2**32)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must lie in [0, 2**32), got {value}")
    return value


def threshold(text: str) -> float:
    """A finite, non-negative number (a NaN limit compared False everywhere: every check passed)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value
