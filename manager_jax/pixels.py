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

import sys
from typing import Any

import numpy as np

from manager_jax import host_threads

IMAGE_MEAN = np.float32(0.5)
IMAGE_STD = np.float32(0.5)


def _normalized_table() -> np.ndarray:
    rescaled = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    return (rescaled - IMAGE_MEAN) / IMAGE_STD


NORMALIZED = _normalized_table()  # float32 [256]: the normalised value of each 8-bit value


# The lookup, two 8-bit values at a time: the crops' bytes read as 16-bit indices into a table of
# 65,536 pairs of normalised values (each pair one integer of twice the output's width), which
# halves the gathers of a plain lookup; large batches are split over threads (numpy's gather
# releases the GIL). The training loop normalises every step's crops on its main thread while the
# device runs the step: 80 crops (8 devices x 2 rows x 5 crops) are 35M values (RESULTS.md, session 25).
_PAIR_INT = {2: (np.uint16, np.uint32), 4: (np.uint32, np.uint64)}
_PAIR_TABLES: dict[np.dtype, np.ndarray] = {}
_THREAD_CHUNK = 1 << 21  # pairs per thread's part (4 MiB of crops)


def _pair_table(dtype: np.dtype) -> np.ndarray | None:
    """[65536] of the pairs' values for a 2- or 4-byte `dtype` (index: first byte + 256 x second,
    little-endian order), None for another width or byte order."""
    if dtype.itemsize not in _PAIR_INT or sys.byteorder != "little":
        return None
    table = _PAIR_TABLES.get(dtype)
    if table is None:
        one, two = _PAIR_INT[dtype.itemsize]
        values = NORMALIZED.astype(dtype).view(one).astype(two)
        table = (values[None, :] | (values[:, None] << (8 * dtype.itemsize))).reshape(-1)  # row: second byte
        _PAIR_TABLES[dtype] = table
    return table


def normalize(pixels: np.ndarray, dtype: Any = np.float32, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 crops -> normalised crops in `dtype` (float32: transformers' `pixel_values`; a
    narrower float is the float32 value rounded to it), written into `out` when given (C-contiguous,
    the crops' shape, `dtype`), e.g. a slice of a step's stacked batch."""
    if pixels.dtype != np.uint8:
        raise TypeError(f"normalize takes uint8 crops, got {pixels.dtype}")
    dtype = np.dtype(dtype)
    if out is None:
        out = np.empty(pixels.shape, dtype)
    elif out.shape != pixels.shape or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"normalize: out must be a C-contiguous {dtype} array of shape {pixels.shape}, "
                         f"got {out.dtype} {out.shape}")
    table = _pair_table(dtype)
    flat_in = np.ascontiguousarray(pixels).reshape(-1)
    flat_out = out.reshape(-1)
    if table is None or flat_in.size < 2:
        np.take(NORMALIZED.astype(dtype), flat_in, out=flat_out)
        return out
    even = flat_in.size - flat_in.size % 2
    pairs_in = flat_in[:even].view(np.uint16)
    pairs_out = flat_out[:even].view(table.dtype)
    parts = [slice(i, i + _THREAD_CHUNK) for i in range(0, pairs_in.size, _THREAD_CHUNK)]
    take = lambda part: np.take(table, pairs_in[part], out=pairs_out[part], mode="clip")  # every index is in range
    if len(parts) > 1 and host_threads.size() > 1:
        list(host_threads.pool().map(take, parts))
    else:
        take(slice(None))
    if even < flat_in.size:
        flat_out[-1] = NORMALIZED.astype(dtype)[flat_in[-1]]
    return out
