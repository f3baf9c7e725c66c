"""A training checkpoint at the real 0.5B shapes: its save, its files, and exporting it.

    python benchmarks/checkpoint_export.py [--workdir DIR] [--variant grid_manager] [--runs 2] [--keep]

Builds a random fp32 train state of the 0.5B model on 8 fake CPU devices (the default training
mesh: FSDP over all 8; Adam moments of the projector and the Manager, as in stage 1), saves it with
the training Checkpointer (synchronously, timed), counts the step directory's files and bytes,
prints the stored chunk of the largest stacked parameter, then, in child processes, each `--runs`
times: exports the checkpoint with `python -m tools.convert_weights from-orbax --format llava`
(wall time and peak RSS measured as in benchmarks/convert.py), and reads every layer of every
stacked parameter the way the export does (`OrbaxSource.read`) and nothing else (peak RSS: what the
stacks cost, apart from the largest unstacked tensor, the 0.54 GB fp32 embedding). The checkpoint
was just written, so reads hit the page cache.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

LARGEST_STACK = ("vision", "layers", "mlp", "fc1", "kernel")  # [26, 1152, 4304]: 516 MB in fp32


# Reads every layer of every stacked parameter as from-orbax does; prints the process's peak RSS.
_STACKED_READS = """
import sys
from tools.convert_weights.orbax_io import OrbaxSource
source = OrbaxSource(sys.argv[1])
for spec in source.specs:
    if spec.stack:
        for i in range(spec.shape[0]):
            source.read(spec.path, i)
        source.release()
with open("/proc/self/status") as f:
    print(next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024)
"""


def stacked_reads_peak_rss(ckpt_dir: str) -> int:
    out = subprocess.run([sys.executable, "-c", _STACKED_READS, ckpt_dir], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    return int(out.split()[-1])


def random_state(cfg, mesh):
    """A train state of `cfg` with random normal params (compression sees realistic bytes)."""
    import jax

    from manager_jax.train.optimizer import OptimConfig
    from manager_jax.train.state import init_state, make_setup
    from manager_jax.train.step import LossConfig

    setup = make_setup(cfg, mesh, tunable_parts="mm_mlp_adapter,mm_manager", optim=OptimConfig(), total_steps=10,
                       loss=LossConfig())
    leaves, treedef = jax.tree.flatten(setup.abstract_params)
    keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
    params = [jax.jit(lambda k, s=s: 0.02 * jax.random.normal(k, s.shape, s.dtype), out_shardings=s.sharding)(k)
              for s, k in zip(leaves, keys)]
    return init_state(setup, jax.tree.unflatten(treedef, params), 0)


def disk_usage(directory: str) -> tuple[int, int]:
    """(files, bytes) under `directory`."""
    files = size = 0
    for root, _, names in os.walk(directory):
        for name in names:
            files += 1
            size += os.path.getsize(os.path.join(root, name))
    return files, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="where to write (default: a temporary directory)")
    parser.add_argument("--variant", default="grid_manager", choices=["baseline", "manager", "grid", "grid_manager"])
    parser.add_argument("--runs", type=int, default=2, help="exports of the checkpoint")
    parser.add_argument("--keep", action="store_true", help="keep the written files")
    args = parser.parse_args()

    from benchmarks.convert import run_measured
    from manager_jax import params_io
    from manager_jax.config import preset
    from manager_jax.sharding import MeshConfig, make_mesh
    from manager_jax.train.checkpointing import Checkpointer

    workdir = args.workdir or tempfile.mkdtemp(prefix="ckpt-export-bench-")
    ckpt_dir, out = os.path.join(workdir, "checkpoints"), os.path.join(workdir, "export")
    try:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        cfg = preset("0.5b", args.variant)
        state = random_state(cfg, make_mesh(MeshConfig()))
        ckpt = Checkpointer(ckpt_dir, async_save=False)
        ckpt.write_model_config(cfg)
        start = time.perf_counter()
        ckpt.save(1, state, [{}], {})
        ckpt.wait()
        save_s = time.perf_counter() - start
        ckpt.close()
        del state
        files, size = disk_usage(os.path.join(ckpt_dir, "1"))
        chunk = params_io.open_stored_array(os.path.join(ckpt_dir, "1", "params"), LARGEST_STACK).chunk_layout
        print(f"save {save_s:.1f} s; step directory {files} files, {size / 1e9:.2f} GB; "
              f"{'.'.join(LARGEST_STACK)} stored in chunks of {tuple(chunk.read_chunk.shape)}", flush=True)
        for run in range(args.runs):
            wall, rss = run_measured(["from-orbax", ckpt_dir, out, "--format", "llava", "--overwrite", "--quiet"])
            print(f"export {run + 1}: {wall:.1f} s, peak RSS {rss / 1e9:.2f} GB; "
                  f"stacked reads alone: peak RSS {stacked_reads_peak_rss(ckpt_dir) / 1e9:.2f} GB", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
