"""Generation speed: prefill latency and decode tokens/s, batch 1 and 16, at the real 0.5B shapes.

    python benchmarks/generate.py [--variant grid_manager] [--batch 1,16] [--image 768x768] \\
        [--text 64] [--new-tokens 128] [--dtype bfloat16]
    python benchmarks/generate.py --tiny          # CPU smoke check (tiny model, small workload)

The workload of the shared PyTorch reference `bench/ref_torch_llava_ov.py --what generate` (run_ref_gpu_gen.sh):
random weights, B prompts each of one HxW image through anyres_max_9 plus `--text` random text
tokens (16 before the image, the rest after), greedy decoding of exactly `--new-tokens` tokens (no
eos). prefill_s: the prefill (vision tower, Manager injections, prompt KV cache, first logits);
decode_s_per_token: the compiled decode loop alone / (new_tokens - 1) (the reference derives it as
(generation - prefill) / (new_tokens - 1)); total_s: the whole generation. Image preprocessing and
host-to-device copies are outside the timings (the reference also starts from pixel tensors on
the device). Each timing is the median of `--repeats` runs after a warm-up run that compiles.
Prints one JSON line per batch size. Compare with the PyTorch reference only when both ran on the
same device.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def build_model(args):
    import jax.numpy as jnp
    from flax import nnx

    from benchmarks.shapes import benchmark_model_config
    from manager_jax.models.llava_ov import LlavaOV

    cfg = benchmark_model_config(args.tiny, args.variant)
    cfg = cfg.replace(dtype=args.dtype, param_dtype=args.dtype, remat_policy="none")
    # Random init on the device, in one compiled program (an eager init of 0.9B parameters is slow).
    model = nnx.jit(lambda: LlavaOV(cfg, rngs=nnx.Rngs(0)))()
    if cfg.manager.enabled:  # non-zero scores, so the injections do real work
        for block in model.manager.blocks:
            if hasattr(block, "layer_scores"):
                block.layer_scores[...] = jnp.full(block.layer_scores.shape, 0.01, block.layer_scores.dtype)
    return model


def prompts_for(args, vocab: int, batch: int):
    import numpy as np
    from PIL import Image

    from manager_jax.data.conversation import IMAGE_TOKEN_INDEX
    from manager_jax.infer.engine import Prompt

    height, width = args.hw
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    before = min(16, args.text)
    ids = rng.integers(0, min(vocab, 150000), args.text)
    row = ids[:before].tolist() + [IMAGE_TOKEN_INDEX] + ids[before:].tolist()
    return [Prompt(row, [image]) for _ in range(batch)]


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(engine, args, batch: int, profile: str | None = None) -> dict:
    import jax

    from manager_jax.infer.sampling import SamplingParams
    from manager_jax.models.decode_attention import KernelConfig

    prepared = engine.prepare(prompts_for(args, engine.cfg.text.vocab_size, batch))
    rows = len(prepared.lengths)
    prepared.inputs = engine._put(prepared.inputs, rows)  # on the device before timing
    params = SamplingParams(max_new_tokens=args.new_tokens)
    cache_len = prepared.prompt_slots + engine.new_slots(prepared, params)

    def prefill():
        logits, cache = engine.prefill(prepared, cache_len)
        jax.block_until_ready((logits, cache))
        return logits, cache

    def generate():
        gens = engine.generate_prepared(prepared, params)
        assert all(len(g.token_ids) == args.new_tokens for g in gens)  # no eos: every token is made
        return gens

    # The first call compiles the prefill and the decode loop. Its tokens' digest tells whether two
    # runs that differ only in speed options (kernels, command buffers) made the same tokens.
    start = time.perf_counter()
    tokens = hashlib.sha1(json.dumps([g.token_ids for g in generate()]).encode()).hexdigest()[:12]
    first_call_s = time.perf_counter() - start  # the compiles (unless cached) and one run
    prefill_s = timed(prefill, args.repeats)
    decode_times = []
    for _ in range(args.repeats):  # the decode loop alone, after a fresh prefill each time
        logits, cache = prefill()
        start = time.perf_counter()
        engine.decode(prepared, logits, cache, params)
        decode_times.append(time.perf_counter() - start)
    total_s = timed(generate, args.repeats)
    decode = statistics.median(decode_times) / (args.new_tokens - 1)  # the first token comes from prefill
    device = jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    peak = (stats or {}).get("peak_bytes_in_use")
    sample = prepared.samples[0]
    rows = max(batch, engine.decode_min_rows)
    result = {
        "what": "generate", "impl": "jax", "variant": args.variant, "tiny": args.tiny, "dtype": args.dtype,
        "decode_layers": "scan" if args.decode_scan else "unrolled", "decode_min_rows": engine.decode_min_rows,
        "decode_attention": engine.decode_attention, "decode_check_every": engine.decode_check_every,
        "decode_command_buffers": engine.decode_command_buffers,
        "decode_multi_output_fusion": engine.decode_multi_output_fusion,
        "decode_xla_options": engine.decode_xla_options or None,
        "decode_kernel": str(dict(engine.decode_kernels).get(rows) or KernelConfig.default_for(rows))
        if engine.decode_attention == "pallas" else None,
        "decode_matmul": engine.decode_matmul,
        "decode_matmul_kernels": ";".join(f"{site}={config}" for site, config in engine.decode_matmul_kernels) or None,
        "batch": batch, "image": args.image, "crops": sample.num_crops, "prompt_len": int(prepared.lengths[0]),
        "prompt_bucket": prepared.prompt_slots, "new_tokens": args.new_tokens, "prefill_s": prefill_s,
        "decode_s_per_token": decode, "decode_tokens_per_s": batch / decode, "total_s": total_s,
        "first_call_s": first_call_s,
        "peak_mem_gb": peak / 2**30 if peak else None, "tokens_sha1": tokens,
        "device": f"{len(jax.devices())} x {device.device_kind}", "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS"),
    }
    if profile:
        from benchmarks.profiling import capture_xplane

        capture_xplane(generate, profile, calls=1)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the reference's tiny shapes (benchmarks/shapes.py) and a small workload (CPU)")
    p.add_argument("--variant", default="grid_manager", choices=["baseline", "manager", "grid", "grid_manager"])
    p.add_argument("--batch", default=None, help="comma-separated batch sizes (default 1,16; tiny: 1,2)")
    p.add_argument("--image", default=None, help="HxW of the image (default 768x768; tiny: 384x384)")
    p.add_argument("--text", type=int, default=64, help="text tokens per prompt")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens to generate (default 128; tiny: 8)")
    p.add_argument("--dtype", default=None, help="compute dtype (default bfloat16; tiny: float32)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 3; tiny: 1)")
    p.add_argument("--decode-scan", action="store_true",
                   help="scan the decoder layers in each decode step instead of unrolling them (engine default)")
    p.add_argument("--decode-min-rows", type=int, default=None,
                   help="decode at least this many rows (InferenceEngine decode_min_rows; default: 2 on GPU, 1 elsewhere)")
    p.add_argument("--decode-attention", default="auto", choices=["auto", "xla", "pallas"],
                   help="the decode steps' attention (InferenceEngine decode_attention): XLA's, the fused Pallas kernels, "
                        "or auto (the kernels on GPUs)")
    p.add_argument("--decode-kernels", action="append", default=[], metavar="ROWS:B,P,W,S[,PEEL];...",
                   help="the Pallas kernels' configs by rows decoded together (InferenceEngine decode_kernels), as "
                        "benchmarks/decode_attention.py prints the fastest; rows not listed: the default. May be "
                        "repeated (a later one wins for its rows): gpu_session.sh's variants cannot hold a ';'")
    p.add_argument("--decode-matmul", default="xla", choices=["xla", "pallas"],
                   help="the decode steps' projections (InferenceEngine decode_matmul): XLA's, or the fused Pallas "
                        "kernels of models/decode_matmul.py (with --decode-attention pallas or auto on a GPU)")
    p.add_argument("--decode-matmul-kernels", default="", metavar="SITE=N,K,W,S;...",
                   help="their configs by projection (InferenceEngine decode_matmul_kernels), as "
                        "benchmarks/decode_matmul.py prints the fastest; projections not listed: the default")
    p.add_argument("--decode-check-every", type=int, default=None,
                   help="tokens decoded between the loop's checks for the end (InferenceEngine decode_check_every; "
                        "default: 8 on GPU, 1 elsewhere; 1: every token, a host round trip each on GPU)")
    p.add_argument("--decode-command-buffers", action="store_true",
                   help="GPU: the decode loop's loops in CUDA graphs, their conditions tested on the device "
                        "(InferenceEngine decode_command_buffers)")
    p.add_argument("--decode-multi-output-fusion", action="store_true",
                   help="GPU: each layer's residual add and the next layer's RMSNorm in one kernel "
                        "(InferenceEngine decode_multi_output_fusion)")
    p.add_argument("--decode-xla-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an XLA option for the decode loop's program alone (InferenceEngine decode_xla_options), "
                        "e.g. xla_gpu_exhaustive_tiling_search=true; may be repeated")
    p.add_argument("--profile", default=None, metavar="FILE.xplane.pb",
                   help="after timing, profile one prefill + decode per batch size (FILE with _b<batch> before .xplane.pb)")
    args = p.parse_args(argv)
    args.batch = args.batch or ("1,2" if args.tiny else "1,16")
    args.image = args.image or ("384x384" if args.tiny else "768x768")
    args.new_tokens = args.new_tokens or (8 if args.tiny else 128)
    args.dtype = args.dtype or ("float32" if args.tiny else "bfloat16")
    args.repeats = args.repeats or (1 if args.tiny else 3)
    args.hw = tuple(int(x) for x in args.image.split("x"))
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (decode time is measured beyond the first token)")

    from manager_jax.infer.engine import InferenceEngine, parse_xla_options
    from manager_jax.models.decode_attention import parse_kernel_configs
    from manager_jax.models.decode_matmul import parse_matmul_configs

    try:
        decode_kernels = parse_kernel_configs(";".join(args.decode_kernels))
        matmul_kernels = parse_matmul_configs(args.decode_matmul_kernels)
        decode_xla_options = parse_xla_options(args.decode_xla_option)
    except ValueError as err:
        p.error(str(err))
    model = build_model(args)
    engine = InferenceEngine(model, eos_ids=[], pad_id=0, min_new_bucket=args.new_tokens,
                             decode_scan_layers=args.decode_scan, decode_min_rows=args.decode_min_rows,
                             decode_attention=args.decode_attention, decode_kernels=decode_kernels,
                             decode_check_every=args.decode_check_every, decode_matmul=args.decode_matmul,
                             decode_matmul_kernels=matmul_kernels, decode_command_buffers=args.decode_command_buffers,
                             decode_multi_output_fusion=args.decode_multi_output_fusion,
                             decode_xla_options=decode_xla_options)
    for batch in (int(b) for b in args.batch.split(",")):
        profile = args.profile.replace(".xplane.pb", f"_b{batch}.xplane.pb") if args.profile else None
        print(json.dumps(bench(engine, args, batch, profile=profile)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
