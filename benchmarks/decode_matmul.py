"""A decode step's decoder layers with their projections on XLA's matmuls or on the fused Pallas
kernels of models/decode_matmul.py, under several configs per projection (GPU).

    python benchmarks/decode_matmul.py                       # rows 2 and 16, the default candidates
    python benchmarks/decode_matmul.py --rows 2 --configs "16,128,4,3;32,256,4,4" --budget-s 90
    python benchmarks/decode_matmul.py --tiny                # CPU smoke check (interpret mode, small)

Qwen2-0.5B layers in bf16 with random weights, run as the engine's decode step runs them (the
decoder's unrolled layers on one new token, the Pallas decode attention over a 4,224-slot cache
whose first 3,763 slots are a prompt), `--layers` layers (4: 120 MB of weights, more than the L2)
`--passes` times over in a device loop per timed call. The time is the median of `--repeats` calls
after a warm-up call, per layer. The attention is the same on both paths, so the difference is the
projections and what the kernels fuse (norms, residual adds, the gate).

Paths: "xla" (decode_matmul="xla"), "pallas" with every projection on `MatmulConfig()`, then for
each projection (qkv, o, gate_up, down) each candidate config with the others on the default.
Each path's output is compared with an fp32 run of the XLA path: one more than twice as far off as
XLA's bf16 path is reported WRONG and never picked. Prints one JSON line per (rows, path), a table,
and per row count the fastest config per projection as `fastest matmul kernels (ROWS rows):
SITE=...;...`, which `benchmarks/generate.py --decode-matmul-kernels` takes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from manager_jax.config import preset, tiny  # noqa: E402
from manager_jax.models.decode_matmul import SITES, SPLIT_SITES, MatmulConfig  # noqa: E402
from manager_jax.models.layers import unstack_layers  # noqa: E402
from manager_jax.models.qwen2 import Qwen2Decoder  # noqa: E402

# Per projection, the likeliest first (a sweep cut short by --budget-s times the ones at the front):
# more programs for the narrow outputs (q/k/v 1,152 columns, o and down 896), longer K steps
# (a block_k that does not divide the input masks its last step: 512 and 1024 read 896 in 2 and 1).
# The fifth field splits the input (o and down only; the other projections skip such configs).
DEFAULT_CANDIDATES = "16,256,4,4;32,128,4,3,4;16,512,4,3;16,1024,8,2;32,256,4,4,8;64,128,4,3;16,128,4,3,8"


def randomize(decoder):
    """Weights of the size a checkpoint's have (std 0.02), norms around 1, non-zero biases."""
    state = nnx.state(decoder, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(1), 256))

    def fill(path, x):
        name = "/".join(str(p) for p in path)
        if "embed" in name:
            return x
        if "scale" in name:
            return (1 + 0.2 * jax.random.normal(next(keys), x.shape)).astype(x.dtype)
        return (0.02 * jax.random.normal(next(keys), x.shape) * (25 if "bias" in name else 1)).astype(x.dtype)

    nnx.update(decoder, jax.tree_util.tree_map_with_path(fill, state))


def workload(cfg, rows: int, layers: int, slots: int, prompt: int, bucket: int, q_slot: int, dtype):
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(rows, 1, cfg.hidden_size)), dtype)
    shape = (layers, rows, slots, cfg.num_kv_heads, cfg.head_dim)
    cache = tuple(jnp.asarray(rng.normal(size=shape), dtype) for _ in range(2))
    seg = np.zeros((rows, slots), np.int32)
    seg[:, bucket - prompt:] = 1
    positions = jnp.full((rows, 1), prompt + q_slot - bucket, jnp.int32)
    return h, cache, jnp.asarray(seg), positions


def configure(decoder, matmul: str, kernels: dict):
    layers = decoder.layers
    layers.attn.decode_impl = "pallas"
    layers.decode_matmul = matmul
    layers.decode_matmul_kernels = tuple(sorted(kernels.items()))
    return nnx.split(decoder)


def step_fn(graphdef, q_slot: int):
    def step(state, h, cache, seg, positions):
        decoder = nnx.merge(graphdef, state)
        ctx = decoder.context(positions, jnp.ones(positions.shape, jnp.int32), kv_seg=seg,
                              q_slot=jnp.asarray([q_slot]), cache_index=jnp.int32(q_slot))
        return decoder(h, ctx, cache=cache, layers=unstack_layers(decoder.layers))
    return step


def time_layers(graphdef, state, work, q_slot: int, layers: int, passes: int, repeats: int):
    """(seconds per layer, the first pass's output, the layers that ran the fused kernels) of the
    decoder's layers on one token, `passes` times over in a device loop."""
    step = step_fn(graphdef, q_slot)

    @jax.jit
    def loop(state, h, cache, seg, positions):
        def one_pass(i, carry):
            h, cache, first = carry
            out, cache = step(state, h, cache, seg, positions)
            return out.astype(h.dtype), cache, jnp.where(i == 0, out, first)
        return jax.lax.fori_loop(0, passes, one_pass, (h, cache, jnp.zeros(h.shape, h.dtype)))

    h, cache, seg, positions = work
    lowered = loop.lower(state, h, cache, seg, positions)
    fused = len(re.findall(r"call @norm_qkv(_\d+)?\(", lowered.as_text()))
    first = jax.block_until_ready(loop(state, h, cache, seg, positions))[2]  # compiles
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(loop(state, h, cache, seg, positions))
        times.append(time.perf_counter() - start)
    return statistics.median(times) / (layers * passes), first, fused


def fastest(lines: list[dict]) -> dict[int, dict[str, MatmulConfig]]:
    """Per row count, per projection, the config of the fastest correct path that varied it, if
    it beat the all-default path."""
    best = {}
    for rows in {x["rows"] for x in lines}:
        mine = [x for x in lines if x["rows"] == rows and x["path"] == "pallas" and x["correct"]]
        default = next((x for x in mine if x["site"] is None), None)
        if default is None:
            continue
        picks = {}
        for site in SITES:
            tried = [x for x in mine if x["site"] == site and x["us_per_layer"] < default["us_per_layer"]]
            if tried:
                picks[site] = MatmulConfig.parse(min(tried, key=lambda x: x["us_per_layer"])["config"])
        best[rows] = picks
    return best


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="2,16", help="rows decoded together (2: batch 1 decoded as two rows)")
    p.add_argument("--configs", default=DEFAULT_CANDIDATES, help="';'-separated block_n,block_k,num_warps,num_stages "
                   "to try for each projection")
    p.add_argument("--sites", default=",".join(SITES), help="the projections whose configs are varied")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--layers", type=int, default=4, help="layers per pass (a decode step has 24)")
    p.add_argument("--passes", type=int, default=16, help="passes over the layers per timed call (a device loop)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke check: 2 tiny layers, interpret mode")
    p.add_argument("--budget-s", type=float, default=0,
                   help="start no path after this many seconds (0: no limit); the table and the fastest follow")
    args = p.parse_args(argv)
    if jax.default_backend() != "gpu" and not args.tiny:
        raise SystemExit("the kernels are timed on a GPU; off the GPU only --tiny runs (interpret mode)")
    try:
        candidates = [MatmulConfig.parse(c.strip()) for c in args.configs.split(";") if c.strip()]
    except ValueError as err:
        raise SystemExit(str(err)) from None
    sites = [s for s in args.sites.split(",") if s]
    if set(sites) - set(SITES):
        raise SystemExit(f"--sites: one or more of {', '.join(SITES)}")
    if args.tiny:  # heads of 32 (the attention kernels' smallest), width 64
        text = tiny("baseline").text
        text = dataclasses.replace(text, head_dim=32)
        slots, prompt, bucket, q_slot, layers, passes, repeats = 64, 40, 48, 50, 2, 2, 1
    else:
        text = preset("0.5b", "baseline").text
        slots, prompt, bucket, q_slot, layers, passes, repeats = 4224, 3763, 4096, 4100, args.layers, args.passes, \
            args.repeats
    dtype = jnp.bfloat16
    text = dataclasses.replace(text, num_layers=layers)
    decoder = Qwen2Decoder(text, dtype=dtype, param_dtype=dtype, scan_layers=False, rngs=nnx.Rngs(0))
    randomize(decoder)
    decoder32 = Qwen2Decoder(text, dtype=jnp.float32, param_dtype=jnp.float32, scan_layers=False, rngs=nnx.Rngs(0))
    nnx.update(decoder32, jax.tree.map(lambda x: x.astype(jnp.float32), nnx.state(decoder, nnx.Param)))
    weight_bytes = sum(x.size * x.dtype.itemsize for path, x in jax.tree_util.tree_leaves_with_path(
        nnx.state(decoder.layers, nnx.Param)) if "kernel" in str(path)) / layers

    # Config by config, every projection for each, so that a sweep cut short by its budget still
    # tried every projection on the first configs.
    paths = [("xla", None, None), ("pallas", None, None)] + [
        ("pallas", site, config) for config in candidates if config != MatmulConfig() for site in sites
        if config.splits == 1 or site in SPLIT_SITES]
    all_rows = [int(r) for r in args.rows.split(",")]
    lines, exact, start = [], {}, time.perf_counter()
    for i, (name, site, config) in enumerate(paths):
        if i > 1 and args.budget_s and time.perf_counter() - start > args.budget_s:  # the two baselines always run
            print(f"# budget of {args.budget_s:g}s spent: {site} {config} and the paths after it not timed", flush=True)
            break
        graphdef, state = configure(decoder, name, {site: config} if site else {})
        for rows in all_rows:
            work = workload(text, rows, layers, slots, prompt, bucket, q_slot, dtype)
            if rows not in exact:  # the fp32 XLA path
                g32, s32 = configure(decoder32, "xla", {})
                exact[rows] = jax.jit(step_fn(g32, q_slot))(s32, *jax.tree.map(
                    lambda x: x.astype(jnp.float32) if x.dtype == dtype else x, work))[0]
            try:
                per_layer, first, fused = time_layers(graphdef, state, work, q_slot, layers, passes, repeats)
            except Exception as e:  # a config Triton cannot compile is reported, not fatal
                print(f"# rows {rows} {name} {site} {config}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            err = float(jnp.abs(first.astype(jnp.float32) - exact[rows]).max())
            xla_err = next((x["max_err"] for x in lines if x["rows"] == rows and x["path"] == "xla"), None)
            tol = 2 * xla_err + 1e-2 if xla_err is not None else float("inf")
            line = {"what": "decode_matmul", "rows": rows, "path": name, "site": site,
                    "config": str(config or MatmulConfig()) if name == "pallas" else None,
                    "us_per_layer": per_layer * 1e6, "weight_gb_per_s": weight_bytes / per_layer / 1e9,
                    "max_err": err, "correct": err <= tol, "layers": layers, "fused_layers": fused,
                    "device": jax.devices()[0].device_kind, "jax": jax.__version__}
            if not line["correct"]:
                print(f"# rows {rows} {name} {site} {config}: WRONG, max error {err:.3g} against {tol:.3g}", flush=True)
            lines.append(line)
            print(json.dumps(line), flush=True)
    lines.sort(key=lambda x: all_rows.index(x["rows"]))
    print("| rows | path | projection varied | config | us per layer | weights GB/s | vs XLA | max error |")
    print("|---|---|---|---|---|---|---|---|")
    for line in lines:
        base = next((x for x in lines if x["rows"] == line["rows"] and x["path"] == "xla"), None)
        ratio = f"{base['us_per_layer'] / line['us_per_layer']:.2f}x" if base else "-"
        print(f"| {line['rows']} | {line['path']} | {line['site'] or '-'} | {line['config'] or '-'} | "
              f"{line['us_per_layer']:.1f} | {line['weight_gb_per_s']:.0f} | {ratio} | "
              f"{line['max_err']:.2g}{'' if line['correct'] else ' WRONG'} |")
    for rows, picks in fastest(lines).items():  # for generate.py --decode-matmul-kernels
        print(f"fastest matmul kernels ({rows} rows): " + ";".join(f"{s}={c}" for s, c in picks.items()))
    return lines


if __name__ == "__main__":
    main()
