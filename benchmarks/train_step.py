"""Train-step benchmark at the real LLaVA-OV-0.5B shapes, comparable with the PyTorch reference.

Workload (as ../shared/bench/ref_torch_llava_ov.py `--what train`): B samples per device, each
one HxW image through the anyres_max_9 multi-grid path (768x768: 5 crops, 3,699 image tokens) plus
T text tokens (16 before the image, T-16 after; seq 4,099 for T=400), every parameter trainable,
AdamW, bf16 compute with fp32 master weights. The step is the real one of `run.py train`
(manager_jax.train.state.jit_train_step: vmapped shard batches, FSDP over the devices, donation).
MFU uses the reference's FLOP formula (manager_jax.train.flops.reference_train_flops).

    python benchmarks/train_step.py                      # 0.5B, B=2 per device, 768x768 + 400 text
    python benchmarks/train_step.py --tiny               # CPU smoke check (tiny model, small image)
    python benchmarks/train_step.py --variant grid_manager --layers scan --remat full

Prints one JSON line (step time median/min, tokens/s, MFU, peak memory).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from manager_jax import multigrid  # noqa: E402
from manager_jax.config import REMAT_POLICIES  # noqa: E402
from manager_jax.batch import ProcessedSample, assemble_batch  # noqa: E402
from benchmarks.shapes import benchmark_model_config  # noqa: E402
from manager_jax.sharding import MeshConfig, batch_sharding, data_parallel_size, make_mesh  # noqa: E402
from manager_jax.train import flops  # noqa: E402
from manager_jax.train.feed import supervised_count  # noqa: E402
from manager_jax.train.optimizer import OptimConfig  # noqa: E402
from manager_jax.train.state import init_params, init_state, jit_train_step, make_setup, place_batch  # noqa: E402
from manager_jax.train.step import LossConfig  # noqa: E402

ALL_PARTS = "mm_vision_tower,mm_mlp_adapter,mm_manager,mm_language_model"


def build_model_config(args):
    cfg = benchmark_model_config(args.tiny, args.variant)
    return cfg.replace(dtype=args.dtype, param_dtype="float32", remat_policy=args.remat, scan_layers=args.layers == "scan",
                       attention_impl=args.attention, vision_token_multiple=args.vision_token_multiple)


def shard_batch(cfg, rng, *, rows: int, image_hw: tuple[int, int], text: int, row_multiple: int = 1
                ) -> tuple[dict, int, int]:
    """`rows` samples, one per row: 16 text tokens, the image, text-16 tokens; all text supervised.
    Rows are the sample's length, or right-padded to a multiple of `row_multiple`."""
    h, w = image_hw
    plan = multigrid.plan_image(
        (w, h), mode=cfg.image.aspect_ratio, pinpoints=cfg.image.grid_pinpoints, convention=cfg.image.convention,
        unpad=cfg.image.has_newline, grid_type=cfg.manager.grid_type if cfg.manager.enabled else None,
    )
    vocab = min(cfg.text.vocab_size, cfg.image_token_id)
    samples = []
    for i in range(rows):
        ids = np.concatenate([rng.integers(0, vocab, 16), [-200], rng.integers(0, vocab, text - 16)])
        labels = np.where(ids == -200, -100, ids)
        pixels = rng.integers(0, 256, size=(plan.num_crops, 384, 384, 3), dtype=np.uint8)
        samples.append(ProcessedSample(id=str(i), ids=ids, labels=labels, pixels=pixels, plans=[plan]))
    seq = -(-(text + plan.num_tokens) // row_multiple) * row_multiple
    batch = assemble_batch(
        samples, rows=rows, seq_len=seq, max_crops=rows * plan.num_crops, max_image_tokens=rows * plan.num_tokens,
        pack=False, grid_type=cfg.manager.grid_type if cfg.manager.enabled else None, query_type=cfg.manager.query_type,
    )
    return batch.to_model_inputs(), plan.num_crops, plan.num_tokens


def loss_token_budget(requested: int, per_shard: list[dict]) -> int:
    """`--loss-token-budget`: -1 = the shard batches' largest supervised count rounded up to a
    multiple of 128 (only supervised positions need logits: the loss is the same)."""
    if requested >= 0:
        return requested
    most = max(supervised_count(s["labels"], s["segment_ids"]) for s in per_shard)
    return -(-most // 128) * 128


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the reference's tiny shapes (benchmarks/shapes.py), a 384x384 image + 64 text tokens (CPU)")
    p.add_argument("--variant", default="grid", choices=["baseline", "manager", "grid", "grid_manager"],
                   help="grid = the reference's LLaVA-OV (no Manager)")
    p.add_argument("--batch-per-device", type=int, default=2)
    p.add_argument("--image", default=None, help="HxW of the image (default 768x768; 384x384 with --tiny)")
    p.add_argument("--text", type=int, default=None, help="text tokens per sample (default 400; 64 with --tiny)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--back-to-back", action="store_true",
                   help="time the steps dispatched back to back with one wait at the end (their mean; run.py train "
                        "runs one step ahead like this), instead of waiting for each step before the next (the median)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--remat", default="dots_acts", choices=list(REMAT_POLICIES),
                   help="remat policy (one H100, 0.5B, unrolled layers: dots_acts 0.125 s / 25.5 GB, dots 0.132 s / "
                        "21.6 GB; RESULTS.md, session 10)")
    p.add_argument("--layers", default="unrolled", choices=["unrolled", "scan"],
                   help="unrolled: a Python loop over the layers (one H100: 0.125 s, compiles in 40 s); scan: one "
                        "lax.scan (0.145 s with remat dots, compiles in 18 s; what the recipes run, for their memory)")
    p.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn"])
    p.add_argument("--vision-token-multiple", type=int, default=0,
                   help="pad the crops through the vision tower to a multiple of this (0 = auto: 768 with cuDNN, 1 = off)")
    p.add_argument("--loss-token-budget", type=int, default=-1,
                   help="positions per shard sent through the LM head: -1 = the batch's supervised ones (rounded up "
                        "to a multiple of 128; the same loss), 0 = all positions, as the reference computes them")
    p.add_argument("--loss-chunk", type=int, default=1024, help="LM-head chunk (positions)")
    p.add_argument("--row-multiple", type=int, default=64,
                   help="right-pad each row to a multiple of this, as a trainer's fixed seq_len is (64: the cuDNN "
                        "kernels' multiple, so no layer pads its attention rows; 0.144 vs 0.147 s unpadded on one "
                        "H100; 1 = the sample's length, as the reference); tokens/s and MFU count the sample's tokens only")
    p.add_argument("--fsdp", type=int, default=-1)
    p.add_argument("--tensor", type=int, default=1)
    p.add_argument("--peak-tflops", type=float, default=None, help="per-device bf16 peak (default: by device kind)")
    p.add_argument("--compile-only", action="store_true",
                   help="lower + compile the real step and print its memory per device, without running it")
    p.add_argument("--profile", default=None, metavar="FILE.xplane.pb",
                   help="after timing, profile two steps into this file (read it with xprof)")
    args = p.parse_args(argv)
    if args.tiny:
        args.warmup, args.steps = min(args.warmup, 1), min(args.steps, 2)
    image = args.image or ("384x384" if args.tiny else "768x768")
    text = args.text or (64 if args.tiny else 400)
    hw = tuple(int(x) for x in image.split("x"))

    cfg = build_model_config(args)
    mesh = make_mesh(MeshConfig(data=1, fsdp=args.fsdp, tensor=args.tensor))
    shards = data_parallel_size(mesh)
    rng = np.random.default_rng(0)
    per_shard = []
    for _ in range(shards):
        arrays, n_crops, n_img = shard_batch(cfg, rng, rows=args.batch_per_device, image_hw=hw, text=text,
                                             row_multiple=args.row_multiple)
        per_shard.append(arrays)
    budget = loss_token_budget(args.loss_token_budget, per_shard)
    loss = LossConfig("shard_mean", budget, args.loss_chunk)
    setup = make_setup(cfg, mesh, tunable_parts=ALL_PARTS, optim=OptimConfig(lr=1e-5, warmup_ratio=0.0, schedule="constant"),
                       total_steps=1000, loss=loss, plain_causal=True)  # one unpadded sample per row
    local = {k: np.stack([s[k] for s in per_shard])[None] for k in per_shard[0]}  # [accum=1, shards, ...]
    if cfg.dtype != "float32":
        local["pixel_values"] = local["pixel_values"].astype(jax.numpy.dtype(cfg.dtype))
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding(mesh, v.ndim)) for k, v in local.items()}
    step = jit_train_step(setup, abstract)
    if args.compile_only:
        t0 = time.perf_counter()
        compiled = step.lower(setup.abstract_state, abstract).compile()
        mem = compiled.memory_analysis()
        result = dict(what="compile", model="tiny" if args.tiny else "0.5b", variant=args.variant, devices=mesh.devices.size,
                      seq=text + n_img, crops=n_crops, image_tokens=n_img, compile_s=time.perf_counter() - t0,
                      arguments_gib=mem.argument_size_in_bytes / 2**30, temporaries_gib=mem.temp_size_in_bytes / 2**30)
        print(json.dumps(result), flush=True)
        return result
    state = init_state(setup, init_params(setup, 0), 0)
    batch = place_batch(setup, local, shards=shards)

    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    for _ in range(max(args.warmup - 1, 0)):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times = []
    if args.back_to_back:
        # Every step dispatched while the one before still runs, one wait at the end: as `run.py
        # train` runs, which dispatches a step before it reads the metrics of the one before.
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        times = [(time.perf_counter() - t0) / args.steps]
    else:
        for _ in range(args.steps):
            t0 = time.perf_counter()
            state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)

    seq = text + n_img
    n_dev = mesh.devices.size
    global_batch = args.batch_per_device * n_dev
    model_flops = flops.reference_train_flops(cfg, batch=global_batch, crops_per_sample=n_crops, seq=seq)
    kind = jax.devices()[0].device_kind
    peak = args.peak_tflops or flops.peak_tflops(kind)
    med = statistics.median(times)
    mem = None
    try:
        stats = jax.devices()[0].memory_stats() or {}
        mem = stats.get("peak_bytes_in_use", 0) / 2**30 or None
    except Exception:  # CPU backends may not report memory
        pass
    result = dict(
        what="train", impl="jax-manager_jax", model="tiny" if args.tiny else "0.5b", variant=args.variant,
        devices=n_dev, device=kind, batch_per_device=args.batch_per_device, image=image, crops=n_crops,
        image_tokens=n_img, seq=seq, row_len=int(local["segment_ids"].shape[-1]), tokens_per_step=global_batch * seq,
        dtype=cfg.dtype, remat=args.remat,
        layers=args.layers, attention=args.attention,
        vision_token_multiple=args.vision_token_multiple, loss_token_budget=budget,
        xla_flags=os.environ.get("XLA_FLAGS"), timing="back_to_back" if args.back_to_back else "per_step",
        compile_s=compile_s, step_s_median=med, step_s_min=min(times), tokens_per_s=global_batch * seq / med,
        samples_per_s=global_batch / med, model_tflops_per_step=model_flops / 1e12,
        mfu=(model_flops / med / (n_dev * peak * 1e12)) if peak else None,
        loss=float(metrics["loss"]), peak_mem_gb=mem, params_total=setup.num_params(), jax=jax.__version__,
    )
    print(json.dumps(result), flush=True)
    if args.profile:
        from benchmarks.profiling import capture_xplane

        def one_step():
            nonlocal state
            state, step_metrics = step(state, batch)
            return step_metrics

        capture_xplane(one_step, args.profile)
    return result


if __name__ == "__main__":
    main()
