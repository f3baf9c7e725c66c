"""Weight conversion at the real 0.5B shapes: wall time and peak RSS, both directions.

    python benchmarks/convert.py [--workdir DIR] [--variant grid_manager] [--shards 1] [--keep]

Writes a random bf16 checkpoint in the original LLaVA-NeXT / Manager layout (SigLIP 26 layers +
Qwen2-0.5B + projector + newline + Manager, ~1.8 GB), converts it to Orbax and back with
`python -m tools.convert_weights` in child processes, checks the round trip is bit-identical per
tensor and prints a table. The source files are freshly written, so reads hit the page cache
(times exclude cold-disk reads). Peak RSS is each converter process's VmHWM (resident high-water
mark, memory-mapped file pages included).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def checkpoint_tensors(cfg) -> dict[str, tuple[int, ...]]:
    """Original-layout key -> shape, from transformers' own module tree (meta device, no memory)."""
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration

    from manager_jax.reference.torch_manager import manager_param_shapes
    from tools.convert_weights import testing

    hf_config = testing.hf_config_for(cfg)
    with torch.device("meta"):
        model = LlavaOnevisionForConditionalGeneration(hf_config)
    shapes = {}
    for name, p in model.state_dict().items():
        key = testing.hf_to_original_key(name)
        if key == "lm_head.weight" and cfg.text.tie_word_embeddings:
            continue
        if key == "model.image_newline" and not cfg.image.has_newline:
            continue
        shapes[key] = tuple(p.shape)
    settings = testing.manager_settings(cfg)
    if settings is not None:
        shapes.update(manager_param_shapes(settings, cfg.text.hidden_size))
    return shapes


def write_random_checkpoint(directory: str, cfg, *, num_shards: int = 1, seed: int = 0) -> int:
    """A random bf16 original-layout checkpoint of `cfg`; returns its size in bytes."""
    import torch
    from safetensors.torch import save_file

    from tools.convert_weights import testing

    os.makedirs(directory, exist_ok=True)
    shapes = checkpoint_tensors(cfg)
    keys = list(shapes)
    gen = torch.Generator().manual_seed(seed)
    per = -(-len(keys) // num_shards)
    weight_map, total = {}, 0
    for k in range(num_shards):
        name = "model.safetensors" if num_shards == 1 else f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors"
        chunk = {key: (torch.randn(shapes[key], generator=gen) * 0.02).to(torch.bfloat16)
                 for key in keys[k * per:(k + 1) * per]}
        save_file(chunk, os.path.join(directory, name), metadata={"format": "pt"})
        weight_map.update({key: name for key in chunk})
        total += sum(t.numel() * 2 for t in chunk.values())
        del chunk
    if num_shards > 1:
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(testing.original_config_json(cfg, torch_dtype="bfloat16", declare_vision=False), f, indent=2)
    return total


# Runs the converter and records its own peak RSS (VmHWM) at exit. VmHWM belongs to the memory map
# created by exec, so unlike wait4()'s ru_maxrss it does not include the RSS of the forking parent.
_WRAPPER = """
import atexit, os, runpy, sys
def _report():
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    with open(os.environ["CONVERT_BENCH_RSS_FILE"], "w") as out:
        out.write(str(kb * 1024))
atexit.register(_report)
sys.argv = ["tools.convert_weights"] + sys.argv[1:]
runpy.run_module("tools.convert_weights", run_name="__main__", alter_sys=True)
"""


def run_measured(args: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one converter process; raises if it fails."""
    with tempfile.NamedTemporaryFile(suffix=".rss") as report:
        env = dict(os.environ, CONVERT_BENCH_RSS_FILE=report.name)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _WRAPPER, *args], cwd=REPO, env=env)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"conversion failed ({proc.returncode}): {' '.join(args)}")
        with open(report.name) as f:
            return wall, int(f.read())


def compare_bitwise(a_dir: str, b_dir: str) -> int:
    """Number of tensors compared; raises on the first difference (official safetensors reader)."""
    import torch
    from safetensors import safe_open

    def index(directory):
        out = {}
        for name in os.listdir(directory):
            if name.endswith(".safetensors"):
                with safe_open(os.path.join(directory, name), "pt") as f:
                    out.update({k: os.path.join(directory, name) for k in f.keys()})
        return out

    ia, ib = index(a_dir), index(b_dir)
    if set(ia) != set(ib):
        raise AssertionError(f"tensor names differ: {sorted(set(ia) ^ set(ib))[:10]}")
    for key in ia:
        with safe_open(ia[key], "pt") as fa, safe_open(ib[key], "pt") as fb:
            ta, tb = fa.get_tensor(key), fb.get_tensor(key)
        if ta.dtype != tb.dtype or not torch.equal(ta.view(torch.uint8), tb.view(torch.uint8)):
            raise AssertionError(f"{key} differs after the round trip")
    return len(ia)


def benchmark(workdir: str, variant: str = "grid_manager", num_shards: int = 1, check: bool = True) -> list[dict]:
    """Runs both directions; returns one row per direction."""
    from manager_jax.config import preset

    cfg = preset("0.5b", variant)
    src, params, back = (os.path.join(workdir, n) for n in ("original", "orbax", "back"))
    for d in (params, back):
        shutil.rmtree(d, ignore_errors=True)
    t0 = time.perf_counter()
    size = write_random_checkpoint(src, cfg, num_shards=num_shards)
    print(f"wrote a random {variant} 0.5B checkpoint: {size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s",
          flush=True)
    rows = []
    wall, rss = run_measured(["to-orbax", src, params, "--quiet"])
    rows.append({"direction": "original -> Orbax", "wall_s": wall, "peak_rss_gb": rss / 1e9, "ratio": rss / size})
    wall, rss = run_measured(["from-orbax", params, back, "--format", "llava", "--quiet"])
    rows.append({"direction": "Orbax -> original", "wall_s": wall, "peak_rss_gb": rss / 1e9, "ratio": rss / size})
    if check:
        n = compare_bitwise(src, back)
        print(f"round trip bit-identical for all {n} tensors", flush=True)
    for row in rows:
        row["checkpoint_gb"] = size / 1e9
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| direction | checkpoint (GB) | wall (s) | peak RSS (GB) | RSS / checkpoint |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['direction']} | {r['checkpoint_gb']:.2f} | {r['wall_s']:.1f} | {r['peak_rss_gb']:.2f} "
                     f"| {r['ratio']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="where to write the checkpoints (default: a temporary directory)")
    parser.add_argument("--variant", default="grid_manager", choices=["baseline", "manager", "grid", "grid_manager"])
    parser.add_argument("--shards", type=int, default=1, help="number of input shards")
    parser.add_argument("--no-check", action="store_true", help="skip the bitwise round-trip comparison")
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="convert-bench-")
    try:
        rows = benchmark(workdir, args.variant, args.shards, check=not args.no_check)
        print(f"\n{os.cpu_count()} CPU cores\n" + format_table(rows))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
