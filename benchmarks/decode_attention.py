"""A decode step's attention block alone: the Pallas kernels under several divisions of the work
against XLA's path, at the generate benchmark's shapes (GPU).

    python benchmarks/decode_attention.py                   # rows 2 and 16, the default grid
    python benchmarks/decode_attention.py --rows 16 --configs "128,264,4,2;64,528,4,3"
    python benchmarks/decode_attention.py --tiny            # CPU smoke check (interpret mode, small)

Qwen2-0.5B's heads (14 query heads, 2 KV heads of 64) over a bf16 cache of the benchmark's
4,224 slots (a 4,096-slot prompt bucket and 128 new tokens), the query at slot 4,100, every
row's prompt 3,763 tokens long (left-padded, as the engine lays it out). One call runs the block
for `--layers` layers in a row (4: each layer is its own Triton compile), as a decode step does,
`--passes` times over in a device loop (32), with the cache donated and written in place. The
time is the median of `--repeats` calls after a warm-up call, divided by layers x passes.

Each config is `block,programs,num_warps,num_stages[,peel]` (`models/decode_attention.py KernelConfig`;
peel 0: the first key block in the pipelined loop too).
Each path's output is checked against the XLA step in fp32 first: a config more than twice as
far off as XLA's bf16 path is reported WRONG and never picked. Prints one JSON line per
(rows, path), a table with the keys and values read per second, and the fastest config per row
count as `fastest kernels: 2:...;16:...`, which
`benchmarks/generate.py --decode-kernels` takes.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from manager_jax.models.attention import _xla_attention, segment_causal_mask  # noqa: E402
from manager_jax.models.decode_attention import KernelConfig, decode_attention, key_block  # noqa: E402
from manager_jax.models.qwen2 import apply_rope, rope_cos_sin  # noqa: E402

# The likeliest first: a sweep cut short by --budget-s times the ones at the front.
# "128,32,4,4": one split per (row, KV head) at 16 rows, so no combine kernel runs. "...,0": the
# defaults for 2 and 16 rows without the peeled first block (fewer memory round trips in a row in
# the sm_90 code; not timed yet).
DEFAULT_CONFIGS = ";".join([
    "128,528,4,2", "128,264,4,3",  # the defaults for 2 and 16 rows (`KernelConfig.default_for`)
    "128,528,4,2,0", "128,264,4,3,0", "128,264,4,4,0",
    "128,264,4,2", "64,528,4,3", "64,264,4,3", "128,32,4,4", "128,132,4,2",
    "128,1056,4,2", "64,1056,4,3", "32,528,4,3", "128,264,8,2", "64,528,4,4",
])


def xla_step(qkv, biases, cos, sin, k_cache, v_cache, q_seg, kv_seg, q_slot, *, layer: int):
    """What the kernels replace, as the model's XLA path computes it: biases and RoPE, the new key
    and value written at q_slot, then attention over the first kv_seg.shape[1] slots."""
    heads, kv = biases[0].shape[0], biases[1].shape[0]
    q, k, v = qkv[:, :heads] + biases[0], qkv[:, heads:heads + kv] + biases[1], qkv[:, heads + kv:] + biases[2]
    rope = lambda x: apply_rope(x[:, None], cos[:, None], sin[:, None])[:, 0]
    q, k = rope(q), rope(k)
    k_cache, v_cache = k_cache.at[layer, :, q_slot].set(k), v_cache.at[layer, :, q_slot].set(v)
    s = kv_seg.shape[1]
    mask = segment_causal_mask(jnp.asarray([q_slot]), jnp.arange(s), q_seg[:, None], kv_seg)
    out = _xla_attention(q[:, None], k_cache[layer, :, :s], v_cache[layer, :, :s], mask, q.shape[-1] ** -0.5)[:, 0]
    return out, k_cache, v_cache


def parse_configs(text: str) -> list[KernelConfig]:
    try:
        return [KernelConfig.parse(c.strip()) for c in text.split(";") if c.strip()]
    except ValueError as err:
        raise SystemExit(str(err)) from None


def fastest(lines: list[dict]) -> dict[int, KernelConfig]:
    """The fastest kernel config per row count, among the timed ones that computed correctly."""
    best = {}
    for line in lines:
        if not line.get("correct", True):
            continue
        if line["path"] == "pallas" and (line["rows"] not in best or line["us_per_layer"] < best[line["rows"]][0]):
            fields = {f.name: line[f.name] for f in dataclasses.fields(KernelConfig)}
            best[line["rows"]] = (line["us_per_layer"], KernelConfig(**fields))
    return {rows: config for rows, (_, config) in best.items()}


def workload(rows: int, layers: int, slots: int, prompt: int, bucket: int, heads: int, kv: int, d: int, dtype):
    """(token inputs, k_cache, v_cache, q_seg, kv_seg): random values, each row's prompt left-padded
    in the first `bucket` slots, new tokens after them."""
    rng = np.random.default_rng(0)
    qkv = jnp.asarray(rng.normal(size=(rows, heads + 2 * kv, d)), dtype)
    biases = tuple(jnp.asarray(rng.normal(size=(n, d)), dtype) for n in (heads, kv, kv))
    cos, sin = rope_cos_sin(jnp.full((rows, 1), bucket + 4), d, 1e6, dtype)
    seg = np.zeros((rows, slots), np.int32)
    seg[:, bucket - prompt:] = 1
    cache = lambda: jnp.asarray(rng.normal(size=(layers, rows, slots, kv, d)), dtype)
    return (qkv, biases, cos[:, 0], sin[:, 0]), cache(), cache(), jnp.ones((rows,), jnp.int32), jnp.asarray(seg)


def time_block(step, token, k, v, q_seg, seg, q_slot, layers: int, passes: int, repeats: int):
    """Seconds per layer of `step(*token, k, v, q_seg, seg, q_slot, layer=layer)` run for every layer,
    `passes` times over in one call (a loop on the device, as the decode loop runs them), and the
    caches (the ones passed in are donated).

    One pass of a few layers per call was mostly the call's own dispatch and wait: session 10 timed
    51.5 us per layer at 16 rows this way, where the same kernels took 18 us inside the decode loop.
    """

    @functools.partial(jax.jit, donate_argnums=(1, 2))
    def all_layers(token, k, v, q_seg, seg):
        def one_pass(_, carry):
            _, k, v = carry
            outs = []
            for layer in range(layers):
                out, k, v = step(*token, k, v, q_seg, seg, q_slot, layer=layer)
                outs.append(out)
            return jnp.stack(outs), k, v  # every layer's output is used, so none is left out

        first = jax.ShapeDtypeStruct((layers, *token[0].shape[:1], token[1][0].shape[0], token[0].shape[-1]), k.dtype)
        return jax.lax.fori_loop(0, passes, one_pass, (jnp.zeros(first.shape, first.dtype), k, v))

    out, k, v = all_layers(token, k, v, q_seg, seg)  # compiles
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out, k, v = all_layers(token, k, v, q_seg, seg)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - start)
    return statistics.median(times) / (layers * passes), k, v


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="2,16", help="rows decoded together (2: batch 1 decoded as two rows)")
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help="';'-separated block,programs,num_warps,num_stages[,peel]")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--layers", type=int, default=4, help="layers per pass (a decode step has 24)")
    p.add_argument("--passes", type=int, default=32, help="passes over the layers per timed call (a device loop)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke check: 2 layers, 256 slots, interpret mode")
    p.add_argument("--budget-s", type=float, default=0,
                   help="start no config after this many seconds (0: no limit); the table and the fastest follow")
    args = p.parse_args(argv)
    interpret = jax.default_backend() != "gpu"
    if interpret and not args.tiny:
        raise SystemExit("the kernels are timed on a GPU; off the GPU only --tiny runs (interpret mode)")
    slots, prompt, bucket, q_slot = (256, 150, 192, 196) if args.tiny else (4224, 3763, 4096, 4100)
    layers = 2 if args.tiny else args.layers
    heads, kv, d, dtype = 14, 2, 64, jnp.bfloat16
    configs = parse_configs(args.configs)
    repeats = 1 if args.tiny else args.repeats
    passes = 2 if args.tiny else args.passes
    all_rows = [int(r) for r in args.rows.split(",")]
    work = {rows: workload(rows, layers, slots, prompt, bucket, heads, kv, d, dtype) for rows in all_rows}
    paths = [("xla", None, xla_step)] + [
        ("pallas", c, functools.partial(decode_attention, interpret=interpret, config=c)) for c in configs]
    # Each path's output against the XLA step in fp32: a config whose kernel compiles but computes
    # wrongly is reported and never picked.
    exact = {rows: xla_step(*jax.tree.map(lambda x: x.astype(jnp.float32), (*w[0], w[1], w[2])), w[3], w[4], q_slot,
                            layer=0)[0] for rows, w in work.items()}
    tolerance = {}
    lines, start = [], time.perf_counter()
    # Config by config, every row count for each, so that a sweep cut short by its budget still
    # compares row counts on the configs it reached.
    for i, (name, config, step) in enumerate(paths):
        if i and args.budget_s and time.perf_counter() - start > args.budget_s:  # XLA's path, the baseline, always runs
            print(f"# budget of {args.budget_s:g}s spent: {name} {config} and the configs after it not timed", flush=True)
            break
        for rows in all_rows:
            token, k, v, q_seg, seg = work[rows]
            # Keys and values a layer reads: the prompt's and the decoded tokens' slots before the query.
            read_bytes = 2 * rows * (prompt + q_slot - bucket) * kv * d * jnp.dtype(dtype).itemsize
            try:
                got = step(*token, k, v, q_seg, seg, q_slot, layer=0)[0]
                err = float(jnp.abs(got.astype(jnp.float32) - exact[rows]).max())
                per_layer, k, v = time_block(step, token, k, v, q_seg, seg, q_slot, layers, passes, repeats)
            except Exception as e:  # a config Triton cannot compile is reported, not fatal
                print(f"# rows {rows} {name} {config}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                if k.is_deleted():  # it failed after taking the caches
                    k, v = workload(rows, layers, slots, prompt, bucket, heads, kv, d, dtype)[1:3]
                work[rows] = (token, k, v, q_seg, seg)
                continue
            work[rows] = (token, k, v, q_seg, seg)  # the old caches were donated
            if name == "xla":  # the baseline, timed first: a kernel may be twice as far off
                tolerance[rows] = 2 * err + 1e-2
            tol = tolerance.get(rows, 1e-2)
            line = {"what": "decode_attention", "rows": rows, "path": name, "us_per_layer": per_layer * 1e6,
                    "kv_read_gb_per_s": read_bytes / per_layer / 1e9, "max_err": err,
                    "correct": err <= tol, "slots": slots, "layers": layers,
                    "device": jax.devices()[0].device_kind, "jax": jax.__version__}
            if not line["correct"]:
                print(f"# rows {rows} {name} {config}: WRONG, max error {err:.3g} against {tol:.3g}", flush=True)
            if config is not None:
                line.update(dataclasses.asdict(config), key_block=key_block(slots, config.block))
            lines.append(line)
            print(json.dumps(line), flush=True)
    lines.sort(key=lambda x: all_rows.index(x["rows"]))  # the table by row count, in path order
    print("| rows | path | block | programs | warps | stages | peel | us per layer | KV read GB/s | vs XLA | max error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for line in lines:
        base = next((x for x in lines if x["rows"] == line["rows"] and x["path"] == "xla"), None)
        ratio = f"{base['us_per_layer'] / line['us_per_layer']:.2f}x" if base else "-"
        cfg = [str(line.get(f, "-")) for f in ("key_block", "programs", "num_warps", "num_stages", "peel")]
        print(f"| {line['rows']} | {line['path']} | {' | '.join(cfg)} | {line['us_per_layer']:.1f} | "
              f"{line['kv_read_gb_per_s']:.0f} | {ratio} | {line['max_err']:.2g}{'' if line['correct'] else ' WRONG'} |")
    # For `benchmarks/generate.py --decode-kernels` (gpu_session.sh reads this line).
    print("fastest kernels: " + ";".join(f"{rows}:{config}" for rows, config in fastest(lines).items()))
    return lines


if __name__ == "__main__":
    main()
