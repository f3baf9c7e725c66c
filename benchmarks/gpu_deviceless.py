"""Compile the benchmarks' train step or decode loop for an H100 on a machine without a GPU.

    # a separate venv with this repository's requirements and the CUDA plugin of the same jax:
    pip install -r requirements.txt "jax[cuda12]==$(python -c 'import jax; print(jax.__version__)')"
    python benchmarks/gpu_deviceless.py --what train --out train.hlo      # 0.5B, B=2, 768x768 + 400
    python benchmarks/gpu_deviceless.py --what decode --rows 16 --out decode.hlo

XLA compiles for a GPU described by a target config (`GpuTargetConfigProto`) without one attached
(`jax.experimental.topologies.get_topology_desc(..., "cuda", target_config=...)`). The program is
the one the GPU would run, except for the choices that need the card itself: with no autotuning,
every matmul becomes a Triton GEMM with default tiles (on the card, cuBLAS takes some). The script
writes the optimized HLO and prints its launches and bytes written by kind (benchmarks/hlo_traffic.py).
It is for reading the program: zero-filled stacks, layout transposes, per-layer copies, kernels
per decoded token. Timings come from the device (benchmarks/gpu_session.sh).

`--card-dump DIR` compiles for a card that ran benchmarks/gpu_session.sh instead, from the XLA
dump that session brought back (xla_dump.tar.gz, unpacked): the card's own description and its
autotuner's picks, so the program is the one that card ran (every fusion must have a pick unless
`--allow-missing-autotune`). Its optimized HLO is in the dump too, for reading as it is.

The model's "auto" choices follow the platform being compiled for (`manager_jax.platform`), so the
compiled program is the GPU one (cuDNN attention, two-row decode, the Pallas decode attention,
crops padded to 768).

`--topology v5p:2x2x1` compiles the same programs for one TPU chip instead (libtpu, with
`TPU_WORKER_HOSTNAMES=localhost`; no CUDA plugin needed). The counts then read differently: a TPU
program is one stream of ops, not kernel launches, and its async copies into VMEM
("copy to VMEM (prefetch)") are the weights being read.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host runs nothing; XLA only compiles for the target

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def target_devices(topology: str = "h100:1", gpu_config: str | None = None):
    """The devices of `topology` (default: one H100 SXM, 80 GB HBM3, described to XLA, not attached)."""
    from manager_jax.train.aot import AotError, topology_devices

    try:
        return topology_devices(topology, gpu_config)
    except AotError as err:
        raise SystemExit(str(err)) from err


def card_dump(folder: str, merged_autotune: str) -> tuple[str, str]:
    """(topology, target config text) of the card whose XLA dump is under `folder` (gpu_session.sh's
    xla_dump.tar.gz, unpacked), after writing every autotune result found there into one file,
    `merged_autotune`. A result is keyed by the card and the fusion's own HLO, so those of one
    program also serve another's fusions of the same shapes."""
    from manager_jax.train.aot import GPU_CARDS

    configs, results, version = [], [], None
    for root, _, names in sorted(os.walk(folder)):
        for name in sorted(names):
            path = os.path.join(root, name)
            if name.endswith("gpu_target_config.pbtxt"):
                configs.append(path)
            elif name.endswith("autotune_results.pbtxt"):
                with open(path) as f:
                    for line in f:
                        if line.startswith("version:"):
                            version = version or line
                        else:
                            results.append(line)
    if not configs:
        raise SystemExit(f"--card-dump {folder}: no *gpu_target_config.pbtxt under it (unpack the xla_dump.tar.gz "
                         "that benchmarks/gpu_session.sh brings back from a GPU)")
    with open(configs[0]) as f:
        config = f.read()
    with open(merged_autotune, "w") as f:
        f.write((version or "version: 3\n") + "".join(results))
    described = re.search(r'device_description_str: "([^"]*)"', config)
    card = next((key for key, c in GPU_CARDS.items() if described and c["description"] == described.group(1)), "h100")
    return f"{card}:1", config


def compile_train(args, devices) -> str:
    from benchmarks import train_step as bench
    from manager_jax.sharding import MeshConfig, batch_sharding, make_mesh
    from manager_jax.train.aot import memory_line, memory_per_chip
    from manager_jax.train.optimizer import OptimConfig
    from manager_jax.train.state import jit_train_step, make_setup
    from manager_jax.train.step import LossConfig

    cfg = bench.build_model_config(args)
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), devices=devices)
    arrays, _, _ = bench.shard_batch(cfg, np.random.default_rng(0), rows=args.batch_per_device, image_hw=(768, 768),
                                     text=400, row_multiple=args.row_multiple)
    budget = bench.loss_token_budget(args.loss_token_budget, [arrays])
    setup = make_setup(cfg, mesh, tunable_parts=bench.ALL_PARTS,
                       optim=OptimConfig(lr=1e-5, warmup_ratio=0.0, schedule="constant"), total_steps=1000,
                       loss=LossConfig("shard_mean", budget, 1024), plain_causal=True)
    local = {k: np.asarray(v)[None, None] for k, v in arrays.items()}
    local["pixel_values"] = local["pixel_values"].astype(jnp.dtype(cfg.dtype))
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding(mesh, v.ndim)) for k, v in local.items()}
    compiled = jit_train_step(setup, abstract).lower(setup.abstract_state, abstract).compile()
    print(f"train step memory on the device: {memory_line(memory_per_chip(compiled, devices[0].platform))}")
    return compiled.as_text()


def compile_decode(args, devices, cfg=None) -> str:
    """The decode loop's optimized HLO; `cfg`: another model than the benchmarks' (tests)."""
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from benchmarks.shapes import benchmark_model_config
    from manager_jax.infer.engine import MAX_EOS_IDS, InferenceEngine
    from manager_jax.models.decode_matmul import parse_matmul_configs
    from manager_jax.models.llava_ov import LlavaOV

    cfg = (cfg or benchmark_model_config(False, args.variant)).replace(dtype="bfloat16", param_dtype="bfloat16")
    model = nnx.eval_shape(lambda: LlavaOV(cfg, rngs=nnx.Rngs(0)))  # shapes only: nothing is allocated
    # decode_check_every 1 (the default here): one token per loop iteration, so the counts are per
    # token. The engine's default unrolls runs of tokens in each iteration.
    engine = InferenceEngine(model, eos_ids=[], pad_id=0, decode_min_rows=args.decode_min_rows,
                             decode_attention=args.decode_attention, decode_check_every=args.decode_check_every,
                             decode_matmul=args.decode_matmul,
                             decode_matmul_kernels=parse_matmul_configs(args.decode_matmul_kernels),
                             decode_command_buffers=args.decode_command_buffers,
                             decode_multi_output_fusion=args.decode_multi_output_fusion)
    rows = max(args.rows, engine.decode_min_rows)
    here = NamedSharding(Mesh(np.asarray(devices[:1]), ("x",)), PartitionSpec())
    shaped = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=here)
    t = cfg.text
    cache_len = args.prompt_slots + args.new_tokens
    cache = tuple(shaped((t.num_layers, rows, cache_len, t.num_kv_heads, t.head_dim), jnp.bfloat16) for _ in range(2))
    controls = {"max_new": np.int32(0), "temperature": np.float32(0), "top_k": np.int32(0), "top_p": np.float32(1),
                "eos": np.zeros(MAX_EOS_IDS, np.int32), "repetition_penalty": np.float32(1), "pad": np.int32(0),
                "vocab_limit": np.int32(0), "stream": np.arange(rows, dtype=np.int32), "live": np.arange(rows) < args.rows}
    key = jax.eval_shape(lambda: jax.random.key(0))
    lowered = engine._decode_jit.lower(
        jax.tree.map(lambda a: shaped(a.shape, a.dtype), engine.state), shaped((rows, t.vocab_size), jnp.float32), cache,
        shaped((rows, cache_len), jnp.int32), shaped((rows,), jnp.int32),
        {k: shaped(np.shape(v), np.asarray(v).dtype) for k, v in controls.items()}, shaped(key.shape, key.dtype),
        greedy=True, new_slots=args.new_tokens,
    )
    return lowered.compile().as_text()


def main(argv=None) -> int:
    from benchmarks.hlo_traffic import report

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", choices=["train", "decode"], default="train")
    p.add_argument("--out", required=True, help="where the optimized HLO text goes")
    p.add_argument("--variant", default="grid", choices=["baseline", "manager", "grid", "grid_manager"])
    p.add_argument("--top", type=int, default=15, help="list the N launches that write the most")
    p.add_argument("--topology", default="h100:1",
                   help="compile for the first device of this topology: h100:1 (default), h200:1, or a TPU "
                        "slice such as v5p:2x2x1 (needs libtpu; set TPU_WORKER_HOSTNAMES=localhost)")
    p.add_argument("--card-dump", metavar="DIR",
                   help="compile for the GPU whose XLA dump is in DIR (benchmarks/gpu_session.sh's xla_dump.tar.gz, "
                        "unpacked) with its autotuner's picks: the program that card ran (instead of --topology)")
    p.add_argument("--allow-missing-autotune", action="store_true",
                   help="with --card-dump: fusions the card did not tune (changed code) take XLA's default tiles "
                        "instead of failing the compile")
    train = p.add_argument_group("train (the shapes of benchmarks/train_step.py)")
    train.add_argument("--batch-per-device", type=int, default=2)
    train.add_argument("--remat", default="dots_acts")
    train.add_argument("--vision-token-multiple", type=int, default=0)
    train.add_argument("--loss-token-budget", type=int, default=-1)
    train.add_argument("--layers", default="unrolled", choices=["unrolled", "scan"])
    train.add_argument("--row-multiple", type=int, default=64,
                       help="right-pad rows to a multiple of this (train_step.py's default)")
    decode = p.add_argument_group("decode (the shapes of benchmarks/generate.py)")
    decode.add_argument("--rows", type=int, default=1, help="prompts decoded together")
    decode.add_argument("--decode-check-every", type=int, default=1,
                        help="InferenceEngine decode_check_every (1: launches and bytes per token)")
    decode.add_argument("--decode-min-rows", type=int, default=None, help="InferenceEngine decode_min_rows")
    decode.add_argument("--decode-attention", default="auto", choices=["auto", "xla", "pallas"],
                        help="InferenceEngine decode_attention (auto: pallas, as on GPUs)")
    decode.add_argument("--decode-matmul", default="xla", choices=["xla", "pallas"],
                        help="InferenceEngine decode_matmul (pallas: the fused projection kernels)")
    decode.add_argument("--decode-matmul-kernels", default="", help="InferenceEngine decode_matmul_kernels, "
                        "as generate.py --decode-matmul-kernels")
    decode.add_argument("--decode-command-buffers", action="store_true",
                        help="InferenceEngine decode_command_buffers (the loops in CUDA graphs)")
    decode.add_argument("--decode-multi-output-fusion", action="store_true",
                        help="InferenceEngine decode_multi_output_fusion (residual add + next RMSNorm in one kernel)")
    decode.add_argument("--prompt-slots", type=int, default=4096)
    decode.add_argument("--new-tokens", type=int, default=128)
    args = p.parse_args(argv)
    args.tiny, args.dtype, args.attention = False, "bfloat16", "auto"

    from manager_jax.train.aot import building_for

    topology, gpu_config = args.topology, None
    if args.card_dump:
        merged = os.path.splitext(args.out)[0] + ".autotune_results.pbtxt"
        topology, gpu_config = card_dump(args.card_dump, merged)
        # Read when XLA first compiles for the GPU, after this point.
        os.environ["XLA_FLAGS"] = " ".join(filter(None, [
            os.environ.get("XLA_FLAGS"), f"--xla_gpu_load_autotune_results_from={merged}",
            "" if args.allow_missing_autotune else "--xla_gpu_require_complete_aot_autotune_results=true"]))
    devices = target_devices(topology, gpu_config)[:1]
    try:
        with building_for(devices):  # the model's "auto" choices are the GPU ones (module doc)
            text = compile_train(args, devices) if args.what == "train" else compile_decode(args, devices)
    except jax.errors.JaxRuntimeError as err:
        if not args.card_dump or not any(m in str(err) for m in ("No cached config found", "Failed to get configs")):
            raise
        raise SystemExit(f"--card-dump {args.card_dump}: the card tuned no fusion like one of this program (the code or "
                         f"the shapes changed since the dump); --allow-missing-autotune gives those XLA's default "
                         f"tiles. XLA: {str(err).splitlines()[0][:400]}") from err
    with open(args.out, "w") as f:
        f.write(text)
    per = "per step" if args.what == "train" else "per decoded token (the token loop's body)"
    print(f"{args.what}: {args.out} ({len(text) / 2**20:.1f} MiB of HLO); launches and bytes written {per}:")
    print(report(text, args.top, in_loops_only=args.what == "decode"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
