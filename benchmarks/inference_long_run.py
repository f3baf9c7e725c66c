"""Many inference batches of varied shapes: do compilations stay within the buckets, does memory plateau?

    python benchmarks/inference_long_run.py [--batches 200] [--report 20] [--sample] [--seed 0]

A tiny random model (width 64, the Qwen2 vocabulary so the offline tokenizer's ids fit) in an
`InferenceEngine`, fed --batches batches each of `generate`, `score` and the lmms-eval adapter's
`loglikelihood` (its stand-in requests): 1-4 prompts of 1-200 random text tokens and one image
of a random size each, 1-8 new tokens (greedy, or half the batches sampled with --sample),
continuations of 1-8 tokens. The shapes vary within few buckets, so every program is compiled
within the first dozens of batches and the rest shows whether anything grows per batch.

Prints a JSON line every --report batches: the host's resident memory, the programs lowered so
far per function (JAX's monitoring events, persistent-cache hits included) and the distinct
bucketed shapes of prefill (rows, prompt slots, crops, image tokens, cache length) and decode
(rows, cache length, greedy) seen so far, which bound what these two may compile; a last line sums
it up. More lowerings than distinct shapes, or resident memory that keeps growing after the last
new program, is a leak.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SIZES = [(384, 384), (90, 60), (60, 90), (640, 320), (200, 700), (1000, 500), (33, 33)]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Instance:
    """What the adapter reads of lmms-eval's Instance."""

    def __init__(self, args: tuple) -> None:
        self.args = args


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--report", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", default="manager",
                        help="tiny() variant: manager (square images, one crop) or grid_manager (anyres_max_9: "
                             "many more shapes)")
    parser.add_argument("--sample", action="store_true", help="draw half the batches with temperature 0.7")
    args = parser.parse_args()

    import jax
    import numpy as np
    from flax import nnx
    from jax._src import dispatch

    from manager_jax.config import tiny
    from manager_jax.data.conversation import IMAGE_TOKEN_INDEX
    from manager_jax.data.tokenizer import load_tokenizer
    from manager_jax.infer.engine import InferenceEngine, Prompt, ScoreRequest
    from manager_jax.infer.lmms_adapter import LlavaOVManagerJax
    from manager_jax.infer.sampling import SamplingParams
    from manager_jax.models.llava_ov import LlavaOV
    from manager_jax.reference.parity import random_image

    lowered: collections.Counter = collections.Counter()

    def on_event(event: str, duration: float, **kwargs) -> None:
        if event == dispatch.JAXPR_TO_MLIR_MODULE_EVENT:
            lowered[str(kwargs.get("fun_name"))] += 1

    jax.monitoring.register_event_duration_secs_listener(on_event)
    tok = load_tokenizer()
    cfg = tiny(args.variant, image_token_id=151646)
    cfg.text.vocab_size = 151936
    engine = InferenceEngine(LlavaOV(cfg, rngs=nnx.Rngs(0)), pad_id=tok.pad_id, im_start_id=tok.im_start_id,
                             eos_ids=tok.eos_ids)
    adapter = LlavaOVManagerJax(engine=engine, tokenizer_obj=tok, batch_size=4)
    rng = np.random.default_rng(args.seed)
    images = [random_image(size, i) for i, size in enumerate(SIZES)]
    words = "the a cat dog red blue square circle left right above below what colour shape is in of".split()
    adapter.task_dict = {"t": {"s": {i: {"images": [i % len(images)]} for i in range(len(images))}}}

    def text(n: int) -> list[int]:
        return rng.integers(10, 150000, n).tolist()

    def prompt() -> Prompt:
        ids = text(int(rng.integers(1, 201)))
        ids.insert(int(rng.integers(0, len(ids) + 1)), IMAGE_TOKEN_INDEX)
        return Prompt(ids, [images[int(rng.integers(0, len(images)))]])

    shapes: dict[str, set] = collections.defaultdict(set)
    start, t0, first_rss = time.time(), None, None
    for b in range(1, args.batches + 1):
        prompts = [prompt() for _ in range(int(rng.integers(1, 5)))]
        temperature = float(rng.choice([0.0, 0.7])) if args.sample else 0.0
        params = SamplingParams(max_new_tokens=int(rng.integers(1, 9)), temperature=temperature)
        prepared = engine.prepare(prompts)
        new_slots = engine.new_slots(prepared, params)
        x = prepared.inputs
        shapes["prefill"].add((len(prepared.lengths), prepared.prompt_slots, x["pixel_values"].shape[0],
                               x["plan_src"].shape[0], prepared.prompt_slots + new_slots))
        shapes["decode"].add((max(len(prepared.lengths), engine.decode_min_rows), prepared.prompt_slots + new_slots,
                              params.greedy))
        engine.generate_prepared(prepared, params)
        requests = []
        for p in [prompt() for _ in range(int(rng.integers(1, 5)))]:
            ids = p.ids + text(int(rng.integers(1, 9)))
            requests.append(ScoreRequest(ids, len(p.ids), len(ids), p.images))
        engine.score(requests)
        # The adapter (batch_size 4): a question about a document's image, a continuation of 1-6 words.
        instances = []
        for _ in range(int(rng.integers(1, 9))):
            doc = int(rng.integers(0, len(images)))
            context = "<image>\n" + " ".join(rng.choice(words, int(rng.integers(1, 60))))
            load = lambda d: [images[d["images"][0]]]  # noqa: E731
            target = " ".join(rng.choice(words, int(rng.integers(1, 7))))
            instances.append(Instance((context, target, load, doc, "t", "s")))
        adapter.loglikelihood(instances)
        if b == min(args.report, args.batches):
            t0, first_rss = time.time(), rss_mb()
        if b % args.report == 0 or b == args.batches:
            print(json.dumps({"batch": b, "t_s": round(time.time() - start, 1), "rss_mb": round(rss_mb(), 1),
                              "lowered": dict(lowered), "distinct": {k: len(v) for k, v in shapes.items()}}), flush=True)
    jax.monitoring.unregister_event_duration_listener(on_event)
    print(json.dumps({"batches": args.batches, "rss_mb_after_first_report": round(first_rss, 1),
                      "rss_mb_end": round(rss_mb(), 1), "seconds_after_first_report": round(time.time() - t0, 1),
                      "lowered": dict(lowered), "distinct": {k: len(v) for k, v in shapes.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
