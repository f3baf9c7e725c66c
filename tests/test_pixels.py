"""manager_jax.pixels.normalize: the SigLIP processor's numbers for uint8 crops, in any float dtype,
on every path (pairs of bytes, an odd last byte, threads, another width, a given output buffer)."""

import multiprocessing
import os

import ml_dtypes
import numpy as np
import pytest
from transformers.image_transforms import normalize as hf_normalize
from transformers.image_transforms import rescale
from transformers.image_utils import ChannelDimension

from manager_jax import host_threads, pixels

LAST = dict(data_format=ChannelDimension.LAST, input_data_format=ChannelDimension.LAST)
DTYPES = [np.float32, ml_dtypes.bfloat16, np.float16, np.float64]


def processor(crops: np.ndarray, dtype) -> np.ndarray:
    """transformers' rescale (1/255) and normalize (mean = std = 0.5), float32, then rounded to `dtype`."""
    flat = crops.reshape(-1, 1, 3) if crops.size % 3 == 0 else crops.reshape(-1, 1, 1)
    x = hf_normalize(rescale(flat, 1 / 255, **LAST), [0.5] * flat.shape[-1], [0.5] * flat.shape[-1], **LAST)
    assert x.dtype == np.float32
    return x.astype(dtype).reshape(crops.shape)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_byte_and_every_pair_of_bytes_is_the_processors_value(dtype):
    every_pair = np.stack(np.meshgrid(np.arange(256), np.arange(256), indexing="ij"), -1).astype(np.uint8)
    crops = np.concatenate([every_pair.reshape(-1), np.arange(256, dtype=np.uint8)])[:196_608].reshape(-1, 16, 16, 3)
    assert same_bits(pixels.normalize(crops, dtype), processor(crops, dtype))
    assert pixels.normalize(np.uint8([0, 255]), dtype).tolist() == [-1.0, 1.0]


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5, 7, 3), (0, 4)])
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_odd_and_empty_inputs(shape, dtype):
    crops = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    assert same_bits(pixels.normalize(crops, dtype), processor(crops, dtype) if crops.size else np.empty(shape, dtype))


def test_a_batch_split_over_threads_and_a_strided_input():
    rng = np.random.default_rng(2)
    crops = rng.integers(0, 256, (20, 384, 384, 3), dtype=np.uint8)
    assert crops.size // 2 > 2 * pixels._THREAD_CHUNK  # several threads' parts, the last one short
    assert same_bits(pixels.normalize(crops, ml_dtypes.bfloat16), processor(crops, ml_dtypes.bfloat16))
    strided = crops[:, ::3, 1::2]
    assert same_bits(pixels.normalize(strided, np.float32), processor(strided, np.float32))


def test_written_into_a_slot_of_a_stacked_batch():
    rng = np.random.default_rng(3)
    shard_batches = [rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8) for _ in range(3)]
    stacked = np.full((1, 3, 2, 8, 8, 3), np.nan, ml_dtypes.bfloat16)
    for slot, crops in enumerate(shard_batches):
        assert pixels.normalize(crops, ml_dtypes.bfloat16, out=stacked[0, slot]) is not None
    want = np.stack([np.stack([processor(c, ml_dtypes.bfloat16) for c in shard_batches])])
    assert same_bits(stacked, want)


@pytest.mark.parametrize("crops, out, message", [
    (np.zeros(4, np.float32), None, "uint8"),
    (np.zeros(4, np.uint8), np.zeros(5, np.float32), "shape"),
    (np.zeros(4, np.uint8), np.zeros(4, np.float16), "float32"),
    (np.zeros((2, 2), np.uint8), np.zeros((2, 4), np.float32)[:, ::2], "C-contiguous"),
])
def test_bad_inputs_are_refused(crops, out, message):
    with pytest.raises((TypeError, ValueError), match=message):
        pixels.normalize(crops, np.float32, out=out)


def _normalise_in_child(queue) -> None:
    crops = np.random.default_rng(4).integers(0, 256, (20, 384, 384, 3), dtype=np.uint8)
    queue.put(pixels.normalize(crops, ml_dtypes.bfloat16).view(np.uint16).sum(dtype=np.int64))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_forked_child_normalises_with_threads_of_its_own():
    """The parent's thread pool exists (a threaded batch ran) when the child is forked; the child's
    threaded batch must not wait for the parent's threads, which it does not have."""
    crops = np.random.default_rng(4).integers(0, 256, (20, 384, 384, 3), dtype=np.uint8)
    want = pixels.normalize(crops, ml_dtypes.bfloat16).view(np.uint16).sum(dtype=np.int64)
    assert host_threads._pool is not None or host_threads.size() == 1
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_normalise_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung on the parent's thread pool")
    assert child.exitcode == 0 and queue.get(timeout=5) == want
