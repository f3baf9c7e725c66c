"""The host's share of a train step: a step's shard batches turned into the model's inputs.

    python benchmarks/host_batch.py [--shards 8] [--crops 10] [--dtype bfloat16] [--repeats 5]

While the device runs a step, `run.py train` reads the next step's shard batches and turns them
into one stacked batch on its main thread (`train/loop.py`, `DataFeed.next`): the crops, uint8
from the data pipeline, are normalised into the model's dtype (`manager_jax.pixels.normalize`)
and stacked with the other fields. A GPU host with 8 devices and 2 rows of one 768x768 image each
(5 crops a row) has 80 crops per step, 35M values: this must take well under the device's step
(0.116 s for the 0.5B model on an H200). The crops are random bytes (the lookup does not depend on
them); the other fields are the size of a 4,160-token row. Printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import ml_dtypes
import numpy as np

if __package__ in (None, ""):  # `python benchmarks/host_batch.py` from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from manager_jax.batch import Batch  # noqa: E402
from manager_jax.train.step import MODEL_FIELDS  # noqa: E402


def shard_batch(rng: np.random.Generator, crops: int, rows: int = 2, seq: int = 4160) -> Batch:
    ints = lambda *shape: rng.integers(0, 1000, shape, dtype=np.int32)
    tokens = crops * 729
    return Batch(
        input_ids=ints(rows, seq), positions=ints(rows, seq), segment_ids=ints(rows, seq), labels=ints(rows, seq),
        pixel_values=rng.integers(0, 256, (crops, 384, 384, 3), dtype=np.uint8), crop_mask=np.ones(crops, bool),
        plan_src=ints(tokens), plan_weight=np.ones(tokens, np.float32), plan_newline=np.zeros(tokens, bool),
        plan_dst=ints(tokens), plan_manager=np.zeros(tokens, bool), plan_image=ints(tokens),
        query_mask=np.zeros((rows, seq), bool),
    )


def stacked_then_copied(batches: list[Batch], dtype) -> dict[str, np.ndarray]:
    """Each shard batch's inputs, then stacked (a copy of the crops)."""
    arrays = [b.to_model_inputs(pixel_dtype=dtype) for b in batches]
    return {name: np.stack([np.stack([a[name] for a in arrays])]) for name in MODEL_FIELDS}


def normalised_in_place(batches: list[Batch], dtype) -> dict[str, np.ndarray]:
    """As `DataFeed.next`: the crops normalised into their slots of the stacked batch."""
    pixels = np.empty((1, len(batches), *batches[0].pixel_values.shape), dtype)
    arrays = [b.to_model_inputs(pixel_dtype=dtype, pixels_out=pixels[0, i]) for i, b in enumerate(batches)]
    return {name: pixels if name == "pixel_values" else np.stack([np.stack([a[name] for a in arrays])])
            for name in MODEL_FIELDS}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=8, help="shard batches per step on this host (its devices)")
    p.add_argument("--crops", type=int, default=10, help="crops per shard batch")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    dtype = ml_dtypes.bfloat16 if args.dtype == "bfloat16" else np.float32
    rng = np.random.default_rng(0)
    batches = [shard_batch(rng, args.crops) for _ in range(args.shards)]
    ways = {"normalise, then stack": stacked_then_copied}
    try:
        batches[0].to_model_inputs(pixel_dtype=dtype, pixels_out=np.empty((args.crops, 384, 384, 3), dtype))
        ways["normalise into the stacked batch"] = normalised_in_place
    except TypeError:  # a checkout from before pixels_out
        pass
    for name, way in ways.items():
        way(batches, dtype)  # warm-up (tables, threads)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            way(batches, dtype)
            times.append(time.perf_counter() - start)
        print(json.dumps({"what": "host_batch", "way": name, "shards": args.shards, "crops": args.crops * args.shards,
                          "dtype": args.dtype, "median_s": statistics.median(times), "min_s": min(times),
                          "cpus": os.cpu_count()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
