"""uint8 crops and their normalisation (manager_jax.pixels): the table reproduces the processor's
float arithmetic for every 8-bit value (tests/test_batch.py: batches hand the model these
floats and other processes the uint8 crops)."""

import ml_dtypes
import numpy as np
import pytest

from manager_jax import pixels


def test_table_is_the_processors_rescale_and_normalisation():
    values = np.arange(256, dtype=np.uint8)
    # SigLipImageProcessor: rescale in float64, cast to float32, (x - 0.5) / 0.5 in float32.
    expected = ((values.astype(np.float64) / 255).astype(np.float32) - np.float32(0.5)) / np.float32(0.5)
    np.testing.assert_array_equal(pixels.normalize(values), expected)
    assert pixels.normalize(values)[0] == -1.0 and pixels.normalize(values)[255] == 1.0
    bf16 = pixels.normalize(values, ml_dtypes.bfloat16)
    assert bf16.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(bf16, expected.astype(ml_dtypes.bfloat16))
    with pytest.raises(TypeError):
        pixels.normalize(values.astype(np.float32))
