"""Crops travel as uint8 RGB through the data pipeline; they are normalised where a batch becomes
the model's input (`Batch.to_model_inputs`).

SigLIP's processor rescales a crop's 8-bit values by 1/255 (in float64, cast to float32) and
normalises them with mean = std = 0.5 in float32 (SPEC §3.1). An 8-bit value has 256 possible
results, so the normalisation is a lookup in a table of them (`NORMALIZED`), straight into the
model's dtype: the same numbers as the processor's arithmetic, without its float64 pass over every
pixel, and the data workers hand over a quarter of the bytes of float32 crops.

The lookup stays on the host: XLA's estimate for the same 256-entry gather on a TPU is about a
second per 74 crops (a gather of single elements), and no float formula without the table gives
the processor's numbers for all 256 values (a multiplication by 1/255 differs for 111 of them).
"""

from __future__ import annotations

from typing import Any

import numpy as np

IMAGE_MEAN = np.float32(0.5)
IMAGE_STD = np.float32(0.5)


def _normalized_table() -> np.ndarray:
    rescaled = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    return (rescaled - IMAGE_MEAN) / IMAGE_STD


NORMALIZED = _normalized_table()  # float32 [256]: the normalised value of each 8-bit value


def normalize(pixels: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
    """uint8 crops -> normalised crops in `dtype` (float32: transformers' `pixel_values`; a
    narrower float is the float32 value rounded to it)."""
    if pixels.dtype != np.uint8:
        raise TypeError(f"normalize takes uint8 crops, got {pixels.dtype}")
    return NORMALIZED.astype(dtype)[pixels]
