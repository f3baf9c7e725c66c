"""Data pipeline throughput: samples/s and crops/s on generated JPEGs, by Grain worker count.

    python benchmarks/data_pipeline.py [--quick] [--workers 0,1,2] [--records 96]

Images are photo-sized JPEGs (640x480 up to 2000x1500, landscape and portrait) with noise
texture so that decoding costs about what a real photo costs; records are single-image VQA
chat turns (qwen_1_5), images in ``anyres_max_9`` with the 36 pinpoints (SPEC §3.7), packed
into fixed-shape batches. "first batch" is the start-up latency (worker processes, first
crops); the rates are measured after it. Each batch is also turned into the model's inputs with
the crops in bfloat16 (`Batch.to_model_inputs`, what the training loop does on its main thread).
Numbers depend on the machine: compare them only with runs on the same host. Printed, never
asserted.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

import ml_dtypes
import numpy as np
from PIL import Image

if __package__ in (None, ""):  # `python benchmarks/data_pipeline.py` from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from manager_jax.config import ModelConfig  # noqa: E402
from manager_jax.data.pipeline import DataConfig, make_train_iterator  # noqa: E402
from manager_jax.data.records import write_records  # noqa: E402
from manager_jax.data.synthetic import Scene, draw_scene, vqa_turns, COLOURS, SHAPES, POSITIONS  # noqa: E402
from manager_jax.data.tokenizer import load_tokenizer  # noqa: E402

SIZES = [(640, 480), (480, 640), (800, 600), (1024, 768), (768, 1024), (1280, 960), (1600, 1200), (2000, 1500)]


def write_dataset(root: str, num_records: int, seed: int = 0) -> str:
    """JPEGs with noise texture + VQA records; returns the records path."""
    rng = random.Random(seed)
    noise_rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    records = []
    for i in range(num_records):
        w, h = SIZES[i % len(SIZES)]
        scene = Scene(w, h, rng.choice(sorted(COLOURS)), rng.choice(SHAPES), rng.choice(POSITIONS))
        pixels = np.asarray(draw_scene(scene), np.int16)
        pixels = np.clip(pixels + noise_rng.normal(0, 18, pixels.shape), 0, 255).astype(np.uint8)
        name = f"images/{i:05d}.jpg"
        Image.fromarray(pixels).save(os.path.join(root, name), quality=90)
        turns = []
        for j, (q, a) in enumerate(vqa_turns(scene, rng)):
            turns += [{"from": "human", "value": ("<image>\n" if j == 0 else "") + q}, {"from": "gpt", "value": a}]
        records.append({"id": f"bench-{i}", "image": name, "conversations": turns})
    path = os.path.join(root, "records.json")
    write_records(path, records)
    return path


def measure(path: str, root: str, workers: int, tokenizer, max_batches: int | None) -> dict:
    data = DataConfig(
        data_path=path, image_folder=root, rows_per_host=2, seq_len=16384, max_crops=64,
        max_image_tokens=32768, pack=True, num_epochs=1, worker_count=workers, read_threads=2,
    )
    start = time.perf_counter()
    it = make_train_iterator(data, ModelConfig(), tokenizer, process_index=0, process_count=1)
    samples = crops = batches = 0
    first = None
    t_first = start
    try:
        for batch in it:
            batch.to_model_inputs(pixel_dtype=ml_dtypes.bfloat16)
            if first is None:
                first = time.perf_counter() - start
                t_first = time.perf_counter()
            else:
                samples += batch.num_samples
                crops += int(batch.crop_mask.sum())
            batches += 1
            if max_batches is not None and batches >= max_batches:
                break
    finally:
        it.close()
    elapsed = time.perf_counter() - t_first
    return {
        "workers": workers, "batches": batches, "first_batch_s": first or 0.0,
        "samples_per_s": samples / elapsed if elapsed > 0 and samples else float("nan"),
        "crops_per_s": crops / elapsed if elapsed > 0 and crops else float("nan"),
        "skipped": it.skips.total,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few records, workers 0 and 1")
    parser.add_argument("--workers", default=None, help="comma-separated worker counts (default 0,1,2)")
    parser.add_argument("--records", type=int, default=None)
    parser.add_argument("--data-dir", default=None, help="reuse / keep the generated images here")
    args = parser.parse_args(argv)
    workers = [int(w) for w in (args.workers or ("0,1" if args.quick else "0,1,2")).split(",")]
    num_records = args.records or (16 if args.quick else 96)

    tokenizer = load_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_dir or tmp
        t0 = time.perf_counter()
        path = write_dataset(root, num_records)
        print(f"generated {num_records} JPEGs {SIZES[0][0]}x{SIZES[0][1]}..{SIZES[-1][0]}x{SIZES[-1][1]} "
              f"in {time.perf_counter() - t0:.1f}s; cpu cores: {os.cpu_count()}; mode anyres_max_9")
        rows = [measure(path, root, w, tokenizer, None) for w in workers]
    print(f"{'workers':>7} {'batches':>7} {'first batch s':>13} {'samples/s':>10} {'crops/s':>9} {'skipped':>7}")
    for r in rows:
        print(f"{r['workers']:>7} {r['batches']:>7} {r['first_batch_s']:>13.2f} {r['samples_per_s']:>10.2f} "
              f"{r['crops_per_s']:>9.1f} {r['skipped']:>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
