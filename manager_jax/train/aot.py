"""Ahead-of-time compilation of the train step for a TPU pod or a GPU cluster, on a CPU host.

    python run.py compile --config configs/llava_ov.py:stage2_grid_manager_7b --topology v5p:2x2x2
    python run.py compile --config configs/llava_ov.py:stage2_grid_manager_72b --topology h100:8x8

Builds compile-only devices (`jax.experimental.topologies.get_topology_desc`), the mesh of the
recipe over them, the abstract train state (`nnx.eval_shape`: nothing is allocated), lowers and
compiles the jitted step exactly as the loop would run it on those devices (the model's "auto"
choices follow them: `manager_jax.platform`), and reports memory per chip and FLOPs per step.

Topologies: a TPU slice as libtpu names it ("v5p:2x2x2", "v5e:4x4"), or N such slices joined over
the data-center network ("2xv5e:4x4", multi-slice: `sharding.make_mesh` puts data, then fsdp,
across the slices); GPUs as "h100:G" or
"h100:HxG" (H hosts of G GPUs; also h200), which XLA compiles for from a description of the card
without one; "cpu:N", N local CPU devices. Neither libtpu nor the CUDA plugin is a requirement of
this project: `pip install "jax[tpu]==<this jax>"` (the libtpu this jax is built against; a newer one
is warned about) for TPU topologies, `pip install "jax[cuda12]==<this jax>"` for GPU ones.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import jax

from manager_jax.platform import compiling_for, use_compilation_cache
from manager_jax.sharding import data_parallel_size, local_shard_indices, make_mesh
from manager_jax.train import flops as flops_lib
from manager_jax.train.recipe import TrainConfig, resolve_batch_layout
from manager_jax.train.state import abstract_step_batch, batch_field_shapes, jit_train_step, make_setup
from manager_jax.train.step import LossConfig

logger = logging.getLogger(__name__)
T = TypeVar("T")

# HBM per chip (GiB) by device_kind substring, most specific first: what a program may use (v5e:
# libtpu refuses programs over 15.75 of its 16), or the nominal size where unchecked.
HBM_GIB = (
    ("TPU v5 lite", 15.75),
    ("TPU v5e", 15.75),
    ("TPU v5", 95.0),  # v5p
    ("TPU v6 lite", 32.0),
    ("TPU v4", 32.0),
    ("H200", 141.0),
    ("H100", 80.0),
)


class AotError(RuntimeError):
    """A topology that cannot be compiled for here (e.g. libtpu missing), or a program the compiler
    fails on other than for lack of memory (`compile_or_refusal`)."""


# What the TPU compiler says when a program cannot fit the chip: it refuses to compile. Its
# "temporaries" are all the program needs at its peak, arguments included (a program of 10 GiB of
# arguments and 8 of temporaries on v5e is refused for "HLO temporaries (18.00G)").
# Its other form, for a program whose buffers it could not place: "Used 17.51G of 15.48G hbm".
_COMPILE_TIME_OOM = re.compile(r"HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)"
                               r"|Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm")
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def compile_time_oom(message: str) -> tuple[float, float] | None:
    """(GiB the program needs, HBM GiB) from the TPU compiler's out-of-memory refusal, or None."""
    m = _COMPILE_TIME_OOM.search(message)
    if not m:
        return None
    needs, needs_unit, hbm, hbm_unit = [g for g in m.groups() if g is not None]
    gib = lambda value, unit: float(value) * _UNITS[unit] / 2**30
    return gib(needs, needs_unit), gib(hbm, hbm_unit)


# XLA's messages can run to pages (HLO text, allocation tables, the compiler's source lines). The
# error keeps their first lines and any later line that states a status ("INTERNAL: ...") or a
# lack of memory; --log-level DEBUG logs the whole message.
_FIRST_LINES = 3
_MOST_LINES = 8
_LINE_CHARS = 300
_STATUS_LINE = re.compile(r"^[A-Z][A-Z_]{3,}: ")  # absl's status codes: NOT_FOUND, INTERNAL, ...
_MEMORY_LINE = re.compile(r"out of memory|exceed", re.IGNORECASE)
_NOISE_LINE = re.compile(r"^=+[^=]*=+$|^[\w./-]+\.(cc|cpp|h|py):\d+$")


def condense_compiler_message(message: str) -> str:
    """The first lines of a compiler's message and its later key lines, each shortened, indented."""
    lines = [line.strip() for line in message.splitlines()]
    lines = [line for line in lines if line and not _NOISE_LINE.match(line)]
    kept = [i for i, line in enumerate(lines)
            if i < _FIRST_LINES or _STATUS_LINE.match(line) or _MEMORY_LINE.search(line)][:_MOST_LINES]
    text = []
    for i in kept:
        line = lines[i]
        if len(line) > _LINE_CHARS:  # its start (the status) and its end (often the numbers)
            line = f"{line[:_LINE_CHARS * 2 // 3]} ... {line[-_LINE_CHARS // 3:]}"
        text.append(f"  {line}")
    if len(kept) < len(lines):
        text.append(f"  ... ({len(lines) - len(kept)} more lines)")
    return "\n".join(text)


def compile_or_refusal(compile_program: Callable[[], T], what: str, topology: str,
                       devices: Sequence[Any]) -> tuple[T | None, tuple[float, float] | None]:
    """`compile_program()` (a `lowered.compile`) -> (the compiled program, None), or (None, (GiB needed, HBM
    GiB)) when the compiler refused it for lack of memory (`compile_time_oom`): an answer the
    reports give, not an error. Any other compiler failure (an op the target lacks, a libtpu that
    does not match this jaxlib, an internal compiler error) is an AotError that names `what` was
    compiled for which devices, with the compiler's message condensed."""
    try:
        return compile_program(), None
    except jax.errors.JaxRuntimeError as err:
        message = str(err)
        oom = compile_time_oom(message)
        if oom is not None:
            return None, oom
        where = f"{topology} ({len(devices)} x {devices[0].device_kind})"
        logger.debug("compiling %s for %s failed; the compiler's whole message:\n%s", what, where, message)
        raise AotError(f"compiling {what} for {where} failed in XLA's compiler (not for lack of memory):\n"
                       f"{condense_compiler_message(message)}\n"
                       "  (--log-level DEBUG logs the whole message and the traceback)") from err


def hbm_gib(device_kind: str) -> float | None:
    for key, value in HBM_GIB:
        if key.lower() in device_kind.lower():
            return value
    return None


# The GPUs XLA can compile for without one (its GpuTargetConfig, as XLA's own tests describe the
# cards): device_memory_size is what the driver reports.
GPU_CARDS = {
    "h100": dict(description="NVIDIA H100 80GB HBM3", memory_bytes=84_929_347_584, bandwidth=3_352_320_000_000),
    "h200": dict(description="NVIDIA H200", memory_bytes=150_754_820_096, bandwidth=4_800_000_000_000),
}
# The share of GPU memory JAX's allocator takes unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise.
JAX_GPU_MEM_FRACTION = 0.75


def gpu_target_config(card: str) -> str:
    """XLA's GpuTargetConfigProto text for a Hopper card of GPU_CARDS. The driver version matters:
    without one, XLA keeps loops and conditionals out of CUDA graphs (they need a driver >= 12.3),
    so the compiled program would differ from the device's."""
    c = GPU_CARDS[card]
    return f"""
gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {c["bandwidth"]} l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: {c["memory_bytes"]} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }} registers_per_core_limit: 65536 registers_per_block_limit: 65536
  driver_version: "12.8.0" runtime_version: "12.8.0"
}}
runtime_version {{ major: 12 minor: 8 }}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 7 }}
device_description_str: "{c["description"]}"
"""


def gpu_memory_gib(device_kind: str) -> tuple[float, float] | None:
    """(memory per GPU, the part JAX's allocator may use) in GiB, for a card of GPU_CARDS."""
    for card in GPU_CARDS.values():
        if card["description"] == device_kind:
            fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", JAX_GPU_MEM_FRACTION))
            total = card["memory_bytes"] / 2**30
            return total, total * fraction
    return None


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


TPU_INSTALL = f'pip install "jax[tpu]=={jax.__version__}"'  # jax and the libtpu it is built against


def libtpu_pin_problem(installed: str, jax_requires: Sequence[str]) -> str | None:
    """Why the installed libtpu is not the one this jax pins for TPUs (its `tpu` extra), or None.
    `pip install libtpu` takes the newest, which an older jax may not load: seen here, libtpu 0.0.52
    under jax 0.10.2 (pinned 0.0.42.*) crashed jax's profiler with a segmentation fault."""
    for requirement in jax_requires:
        m = re.fullmatch(r'libtpu\s*==\s*([\w.]+?)(\.\*)?\s*;.*extra\s*==\s*"tpu".*', requirement.strip())
        if not m:
            continue
        pinned, wildcard = m.groups()
        if installed == pinned or (wildcard and installed.startswith(pinned + ".")):
            return None
        return (f"libtpu {installed} is installed, but jax {jax.__version__} is built for libtpu {pinned}"
                f"{'.*' if wildcard else ''}: compiles may fail and processes crash; {TPU_INSTALL} installs that one")
    return None


def check_libtpu_version() -> None:
    """Warns when the installed libtpu is not the one this jax pins (`libtpu_pin_problem`)."""
    from importlib import metadata

    try:
        problem = libtpu_pin_problem(metadata.version("libtpu"), metadata.requires("jax") or [])
    except metadata.PackageNotFoundError:
        return
    if problem:
        logger.warning("%s", problem)


def _gpu_devices(card: str, shape: str, topology: str, target_config: str | None = None) -> list[Any]:
    parts = shape.lower().split("x")
    if not (1 <= len(parts) <= 2 and all(p.isdigit() and int(p) > 0 for p in parts)):
        raise AotError(f"topology {topology!r}: expected {card}:GPUS or {card}:HOSTSxGPUS, e.g. {card}:8x8")
    hosts, gpus = (1, int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(card, "cuda", target_config=target_config or gpu_target_config(card),
                                            topology=f"1x{hosts}x{gpus}")
    except Exception as err:  # noqa: BLE001 - no CUDA plugin, or one that cannot compile without a GPU
        raise AotError(
            f"cannot build compile-only GPUs for {topology!r} ({type(err).__name__}: {err}); it needs the CUDA "
            f'plugin of this jax: pip install "jax[cuda12]=={jax.__version__}"'
        ) from err
    return list(desc.devices)


# The --topology flag of `run.py compile` and `run.py compile-generate`.
TOPOLOGY_HELP = ("TPU topology like v5p:2x2x2 or v5e:4x4, 2xv5e:4x4 for 2 slices (needs libtpu), GPUs like h100:8 or "
                 "h100:8x8 (hosts x GPUs; needs jax's CUDA plugin), or cpu:N (N local CPU devices)")


def topology_devices(topology: str, gpu_config: str | None = None) -> list[Any]:
    """Compile-only devices of a TPU topology ("v5p:2x2x2") or GPU cluster ("h100:8x8"), or local
    CPU devices ("cpu:8"). `gpu_config`: a GpuTargetConfigProto text to describe the GPUs with
    instead of GPU_CARDS' (a card's own, as XLA dumps it)."""
    name = topology.strip()
    card, _, shape = name.lower().partition(":")
    if card in GPU_CARDS:
        return _gpu_devices(card, shape, topology, gpu_config)
    if card == "cpu":
        devices = jax.devices("cpu")
        if shape and not (shape.strip().isdigit() and int(shape) >= 1):
            raise AotError(f"topology {topology!r}: expected 'cpu' or 'cpu:N' with N >= 1 local CPU devices")
        n = int(shape) if shape else len(devices)
        if n > len(devices):
            raise AotError(
                f"topology {topology!r} needs {n} CPU devices, {len(devices)} exist "
                "(set XLA_FLAGS=--xla_force_host_platform_device_count=N before starting Python)"
            )
        return devices[:n]
    if ":" not in name:
        raise AotError(f"topology {topology!r}: expected like 'v5p:2x2x2', 'v5e:4x4', '2xv5e:4x4', 'h100:8x8' or 'cpu:8'")
    # "2xv5e:4x4": two slices of v5e:4x4, joined over the data-center network (multi-slice).
    slices, name = re.fullmatch(r"(?:(\d+)x)?(.+)", name).groups()
    num_slices = int(slices) if slices else 1
    if num_slices < 1:
        raise AotError(f"topology {topology!r}: the number of slices must be at least 1")
    if not libtpu_available():
        raise AotError(
            f"compiling for TPU topology {topology!r} needs libtpu, which is not installed (it is not in "
            f"requirements.txt): {TPU_INSTALL}"
        )
    # libtpu looks for its hosts; compile-only use needs none but the variable must be set. Another
    # process on this host may hold libtpu's lock file; compiling needs no exclusive TPU access.
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    check_libtpu_version()
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(name, "tpu", num_slices=num_slices)
    except Exception as err:  # libtpu reports unknown names / bad shapes with its own exceptions
        raise AotError(f"libtpu cannot build topology {topology!r}: {err}") from err
    return list(desc.devices)


def cache_compiled_programs(topology: str) -> str | None:
    """The persistent compilation cache of an AOT command (`use_compilation_cache`), for local CPU
    topologies only; returns its folder, or None. A program compiled for compile-only TPU or GPU
    devices cannot be read back (JAX has no client to load it with: each later compile warns and
    compiles again), so storing it would only fill the cache."""
    if topology.strip().lower().partition(":")[0] != "cpu":
        # Off, not just left unset: JAX itself reads a folder from JAX_COMPILATION_CACHE_DIR.
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    return use_compilation_cache()


@contextlib.contextmanager
def building_for(devices: Sequence[Any]) -> Iterator[None]:
    """Builds and compiles as on `devices`: the model's platform choices are theirs, and Pallas GPU
    kernels (which read the target from the default device) compile for their card."""
    with contextlib.ExitStack() as scope:
        scope.enter_context(compiling_for(devices[0].platform))
        if devices[0].platform == "gpu":
            scope.enter_context(jax.default_device(devices[0]))
        yield


def memory_capacity(device_kind: str) -> tuple[float | None, str]:
    """(GiB a program may use per device, how that was found) for `fits`."""
    gpu = gpu_memory_gib(device_kind)
    if gpu is not None:
        total, usable = gpu
        return usable, f"{usable:.0f} GiB of {total:.0f} (JAX's allocator share; XLA_PYTHON_CLIENT_MEM_FRACTION)"
    hbm = hbm_gib(device_kind)
    if hbm and device_kind.startswith("TPU"):
        return hbm, f"{hbm:g} GiB HBM (libtpu compiles only programs that fit it)"
    return hbm, (f"{hbm:g} GiB HBM" if hbm else "")


def attention_kernels(hlo: str | None) -> tuple[str, int | None]:
    """(which attention the compiled program runs, its kernel calls): the Splash kernel (Mosaic
    custom calls on TPU), cuDNN flash attention (GPU), or XLA's."""
    if hlo is None:
        return "unknown", None
    splash = hlo.count('custom_call_target="tpu_custom_call"')
    cudnn = len(re.findall(r'custom_call_target="__cudnn\$fmha', hlo))
    if splash:
        return "splash", splash
    return ("cudnn", cudnn) if cudnn else ("xla", 0)


def memory_per_chip(compiled: Any, platform: str) -> dict[str, float] | None:
    """A compiled program's memory on one device, GiB (None where the backend does not report it).

    The parts are XLA's buffer classes: arguments (donated or not), outputs, aliased (donated
    arguments that outputs reuse), temporaries, code. On GPU and CPU temporaries are the one block
    the runtime allocates for them, so the total is the parts, aliased bytes counted once. libtpu's
    temporaries are not that block: they count more (the 0.5B stage-2 step on v5e:4x4: 17.47 GiB,
    against a 13.21 GiB block in its buffer assignment), so the parts' sum overstates a TPU step
    (there 19.20 GiB, over the chip's 15.75, for a step libtpu compiled). On TPU the total is
    libtpu's peak of the live buffers, arguments included (peak_memory_in_bytes; 14.47 GiB there;
    it leaves out the block's fragmentation: arguments + block are 14.84); whether the program
    fits is libtpu's to say (`fits_chip`)."""
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    gib = lambda name: getattr(mem, name, 0) / 2**30
    per_chip = {
        "arguments_gib": gib("argument_size_in_bytes"),
        "outputs_gib": gib("output_size_in_bytes"),
        "aliased_gib": gib("alias_size_in_bytes"),
        "temporaries_gib": gib("temp_size_in_bytes"),
        "code_gib": gib("generated_code_size_in_bytes"),
    }
    peak = gib("peak_memory_in_bytes") if platform == "tpu" else 0.0
    per_chip["total_gib"] = peak or (
        per_chip["arguments_gib"] + per_chip["outputs_gib"] - per_chip["aliased_gib"]
        + per_chip["temporaries_gib"] + per_chip["code_gib"]
    )
    per_chip["total_is_peak"] = bool(peak)
    return per_chip


def fits_chip(platform: str, totals: Sequence[float | None], capacity: float | None) -> bool | None:
    """Whether compiled programs with these totals (GiB per chip) fit, or None where unknown. On TPU
    a compiled program fits: libtpu refuses to compile one its buffers cannot fit in the chip's HBM
    (`compile_time_oom`). Elsewhere the totals are compared with the capacity."""
    if platform == "tpu":
        return True
    if capacity is None or not totals or any(t is None for t in totals):
        return None
    return max(totals) <= capacity


def compile_for_topology(config: TrainConfig, topology: str, hlo_out: str | None = None) -> dict[str, Any]:
    """Lowers and compiles the train step of `config` for `topology`; returns a report dict.
    `hlo_out`: also write the compiled program's HLO text to this path (whole or not at all)."""
    devices = topology_devices(topology)
    with building_for(devices):
        return _compile_step(config, topology, devices, hlo_out)


def _compile_step(config: TrainConfig, topology: str, devices: list[Any], hlo_out: str | None) -> dict[str, Any]:
    mesh = make_mesh(config.mesh, devices)
    shards, accum = resolve_batch_layout(config, data_parallel_size(mesh))
    loss_cfg = LossConfig(config.loss_normalization, config.loss_token_budget, config.loss_chunk_size)
    setup = make_setup(
        config.model, mesh, tunable_parts=config.tunable_parts, optim=config.optim,
        total_steps=config.num_steps, loss=loss_cfg, plain_causal=not config.data.pack,
    )
    pixel_dtype = None if config.model.dtype == "float32" else config.model.dtype
    fields = batch_field_shapes(
        config.model, rows=config.data.rows_per_host, seq_len=config.data.seq_len,
        max_crops=config.data.max_crops, max_image_tokens=config.data.max_image_tokens, pixel_dtype=pixel_dtype,
    )
    batch = abstract_step_batch(setup, fields, accum=accum, shards=shards)
    step = jit_train_step(setup, batch)
    t0 = time.perf_counter()
    lowered = step.lower(setup.abstract_state, batch)
    kind = devices[0].device_kind
    rows = shards * accum * config.data.rows_per_host
    report = {
        "recipe": config.name,
        "topology": topology,
        "device_kind": kind,
        "devices": mesh.devices.size,  # the mesh's (mesh.num_devices may take fewer than the topology has)
        "mesh": dict(mesh.shape),
        "batch": {"shards": shards, "grad_accum": accum, "rows_per_shard": config.data.rows_per_host,
                  "seq_len": config.data.seq_len, "rows_per_step": rows,
                  **host_batch(mesh, shards=shards, rows=config.data.rows_per_host)},
        "params": setup.num_params(),
        "trainable_params": setup.num_params(trainable_only=True),
        "to_fit": ways_to_fit(config, dict(mesh.shape)),
    }
    compiled, oom = compile_or_refusal(lowered.compile, f"the train step of recipe {config.name!r}", topology, devices)
    if oom is not None:  # the compiler refused: the step does not fit. Reported like any other answer.
        return {**report, "compile_s": time.perf_counter() - t0, "memory_per_chip": None, "hbm_per_chip_gib": oom[1],
                "fits": False, "refused_needs_gib": oom[0], "xla_flops_per_device": None,
                "model_flops_per_step": None, "attention": None, "attention_kernel_calls": None}
    compile_s = time.perf_counter() - t0

    platform = devices[0].platform
    per_chip = memory_per_chip(compiled, platform)
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    cost = cost or {}
    crops_per_row = config.data.max_crops / max(config.data.rows_per_host, 1)
    # Upper bound: every row one sample filling seq_len, every crop real.
    full_batch_flops = rows * flops_lib.train_flops(
        config.model, crops=crops_per_row, tokens=config.data.seq_len,
        sum_sq_lengths=float(config.data.seq_len) ** 2, trainable=setup.tunable_groups,
    )
    capacity, capacity_note = memory_capacity(kind)
    try:
        hlo = compiled.as_text() or ""
    except jax.errors.JaxRuntimeError as err:  # e.g. a libtpu newer than this jaxlib reads back
        if hlo_out:
            raise AotError(
                f"the step compiled, but its HLO text cannot be read back for --hlo-out: {err}. A libtpu newer "
                f"than this jax writes programs it cannot parse: pip install \"jax[tpu]=={jax.__version__}\" "
                "installs the libtpu it pins"
            ) from err
        logger.warning("the compiled step's HLO text cannot be read back (%s); attention kernels not counted", err)
        hlo = None
    attention, attention_calls = attention_kernels(hlo)
    gpu = gpu_memory_gib(kind)
    if per_chip and gpu and capacity < per_chip["total_gib"] <= 0.95 * gpu[0]:  # the GPU has the room
        report["to_fit"] = ["XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 (JAX's allocator then takes "
                            f"{0.95 * gpu[0]:.0f} GiB)", *report["to_fit"]]
    if hlo_out:
        partial = f"{hlo_out}.partial"
        with open(partial, "w") as f:
            f.write(hlo)
        os.replace(partial, hlo_out)
    return {
        **report,
        "compile_s": compile_s,
        "memory_per_chip": per_chip,
        "hbm_per_chip_gib": capacity,
        "capacity": capacity_note,
        "fits": fits_chip(platform, [per_chip and per_chip["total_gib"]], capacity),
        # XLA's count of the compiled program for one device (loops may be counted once per body).
        "xla_flops_per_device": float(cost.get("flops", 0.0)) or None,
        "model_flops_per_step": full_batch_flops,
        "attention": attention,
        "attention_kernel_calls": attention_calls,
    }


def format_report(report: dict[str, Any]) -> str:
    """Human-readable summary of `compile_for_topology`."""
    lines = [
        f"recipe {report['recipe']} on {report['topology']} ({report['devices']} x {report['device_kind']}), mesh {report['mesh']}",
        f"batch: {report['batch']}",
    ]
    if report.get("refused_needs_gib") is not None:
        lines += [
            f"params: {report['params']:,} ({report['trainable_params']:,} trainable); the compiler refused after "
            f"{report['compile_s']:.1f} s",
            f"memory per chip: {refused_line(report)}",
            "to fit: " + "; ".join(report["to_fit"]),
        ]
        return "\n".join(lines)
    lines += [
        f"params: {report['params']:,} ({report['trainable_params']:,} trainable); compiled in {report['compile_s']:.1f} s",
        f"attention: {report['attention']} ({report['attention_kernel_calls']} kernel calls in the program)"
        if report["attention_kernel_calls"] is not None else "attention: unknown (the HLO text could not be read back)",
    ]
    mem = report["memory_per_chip"]
    if mem:
        cap = report["hbm_per_chip_gib"]
        fit = "" if report["fits"] is None else (" -> fits" if report["fits"] else " -> DOES NOT FIT")
        lines.append(f"memory per chip: {memory_line(mem)}" + (f" of {report['capacity']}{fit}" if cap else ""))
    else:
        lines.append("memory per chip: not reported by this backend")
    if report["xla_flops_per_device"]:
        # XLA costs a while loop's body once: with gradient accumulation or scanned layers this is
        # far under the step's real count (7B on v5p:2x2x2: 227x), so say what it counts.
        lines.append(f"XLA FLOPs of the compiled program per device, each loop body counted once "
                     f"(accumulation steps, scanned layers): {report['xla_flops_per_device']:.4g}")
    lines.append(f"model FLOPs per step (full rows): {report['model_flops_per_step']:.4g}")
    if report["fits"] is False:
        lines.append("to fit: " + "; ".join(report["to_fit"]))
    return "\n".join(lines)


def memory_line(mem: dict[str, float]) -> str:
    """'12.34 GiB (peak; arguments ..., temporaries ...)': one program's `memory_per_chip`."""
    return (f"{mem['total_gib']:.2f} GiB ({'peak' if mem['total_is_peak'] else 'sum'}; arguments "
            f"{mem['arguments_gib']:.2f}, outputs {mem['outputs_gib']:.2f}, aliased {mem['aliased_gib']:.2f}, "
            f"temporaries {mem['temporaries_gib']:.2f})")


def refused_line(report: dict[str, Any]) -> str:
    """The TPU compiler's out-of-memory refusal, as a verdict."""
    return (f"libtpu refused to compile: it needs {report['refused_needs_gib']:.2f} GiB (arguments and temporaries) "
            f"of {report['hbm_per_chip_gib']:.2f} GiB HBM -> DOES NOT FIT")


def host_batch(mesh: Any, *, shards: int, rows: int) -> dict[str, int]:
    """What each host of the mesh feeds per accumulation step: its shard batches (`data.rows_per_host`
    is the rows of one shard batch, not of a host) and their rows. Hosts whose devices share a shard
    (a tensor axis across hosts) each read it."""
    hosts = sorted({d.process_index for d in mesh.devices.flat})
    per_host = {len(local_shard_indices(mesh, shards, h)) for h in hosts}
    if len(per_host) != 1:  # make_mesh splits the batch axes evenly; say so if that ever changes
        raise AotError(f"mesh {dict(mesh.shape)} gives its {len(hosts)} hosts unequal shares of the {shards} shards")
    (n,) = per_host
    return {"hosts": len(hosts), "shards_per_host": n, "rows_per_host": n * rows}


def ways_to_fit(config: TrainConfig, mesh_shape: dict[str, int]) -> list[str]:
    """What could bring the step under the chip's memory, leaving out what the config already does."""
    ways = ["more chips (a larger --topology, or on TPU N slices of it: Nx<topology> with --set mesh.data=N; "
            "fsdp=-1 takes them)"]
    heads = config.model.text.num_kv_heads
    tensor = mesh_shape.get("tensor", 1)
    if heads % (2 * tensor) == 0:
        ways.append(f"--set mesh.tensor={2 * tensor}")
    rows = config.data.rows_per_host
    if rows > 1:
        # A shard batch's crop and image-token capacities are set for all its rows (the recipes
        # derive them from rows): kept, one row would still run the vision tower on every crop
        # slot, and the step's pixel input grows with the accumulation steps.
        per_row = lambda total: -(-total // rows)
        ways.append(f"--set data.rows_per_host=1 --set data.max_crops={per_row(config.data.max_crops)} "
                    f"--set data.max_image_tokens={per_row(config.data.max_image_tokens)} (more accumulation steps)")
    if config.model.remat_policy != "full":
        ways.append("--set model.remat_policy=full")
    return ways
