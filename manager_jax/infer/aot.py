"""Ahead-of-time compilation of generation and scoring for a TPU slice or GPUs, on a CPU host.

    python run.py compile-generate --model 72b:grid_manager --topology v5p:2x2x2 --mesh tensor=8
    python run.py compile-generate --model 72b:grid_manager --topology h100:8 --mesh tensor=8

Builds the inference engine over an abstract model (`nnx.eval_shape`: no weights are made) on the
compile-only devices of the topology (`train.aot.topology_devices`), prepares one real batch of
prompts (a generated image of the asked size, random text ids), and compiles the two programs that
`InferenceEngine.generate` runs for it, the prefill (vision tower, Manager, decoder, KV cache) and
the decode loop, and the one that `InferenceEngine.score` runs for the same prompts with a
continuation of `--score-tokens` tokens (lmms-eval's loglikelihood). It reports each program's
memory per chip, so a serving mesh is checked before the machines are booked. Topologies are those of `run.py compile` (`train/aot.py`); `cpu:N`
compiles for N local CPU devices (CPU reports no memory to fit).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from PIL import Image

from manager_jax import exit_status
from manager_jax.config import VARIANTS, ConfigError, ModelConfig, preset
from manager_jax.data.conversation import IMAGE_TOKEN_INDEX
from manager_jax.infer.engine import InferenceEngine, InputError, Prompt, ScoreRequest
from manager_jax.infer.loading import MeshSpecError, mesh_from_spec
from manager_jax.infer.sampling import SamplingParams
from manager_jax.cli_types import image_size
from manager_jax.log_setup import LOG_LEVEL_HELP, log_level, setup_logging
from manager_jax.models.llava_ov import LlavaOV
from manager_jax.train.aot import (TOPOLOGY_HELP, AotError, building_for, cache_compiled_programs, compile_or_refusal,
                                   fits_chip, memory_capacity, memory_line, memory_per_chip, refused_line,
                                   topology_devices)

PROGRAMS = ("prefill", "decode", "score")


@dataclasses.dataclass(frozen=True)
class GenerateWorkload:
    """What one generate call holds: `rows` prompts of one image and `prompt_tokens` text tokens
    each; a score call scores `score_tokens` more tokens after each (0: no score program)."""

    rows: int = 1
    image_size: tuple[int, int] = (768, 768)  # width, height
    prompt_tokens: int = 64
    new_tokens: int = 128
    score_tokens: int = 16

    def prompts(self, vocab_size: int, seed: int = 0) -> list[Prompt]:
        rng = np.random.default_rng(seed)
        image = Image.fromarray(rng.integers(0, 256, (self.image_size[1], self.image_size[0], 3), np.uint8))
        return [Prompt([IMAGE_TOKEN_INDEX, *rng.integers(1, vocab_size, self.prompt_tokens).tolist()], [image])
                for _ in range(self.rows)]

    def score_requests(self, vocab_size: int, seed: int = 0) -> list[ScoreRequest]:
        rng = np.random.default_rng(seed + 1)
        requests = []
        for prompt in self.prompts(vocab_size, seed):
            ids = [*prompt.ids, *rng.integers(1, vocab_size, self.score_tokens).tolist()]
            requests.append(ScoreRequest(ids, len(prompt.ids), len(ids), prompt.images))
        return requests


def model_config(spec: str | None, dtype: str | None, checkpoint: str | None = None) -> ModelConfig:
    """'72b:grid_manager' (a preset: size[:variant]), or the config of a checkpoint directory (its
    weights are not read) -> the ModelConfig in `dtype`."""
    if checkpoint is not None:
        from manager_jax.params_io import ParamsError, load_config

        try:
            cfg = load_config(checkpoint)
        except (FileNotFoundError, ParamsError) as err:
            raise ConfigError(f"cannot read the model config of checkpoint {checkpoint!r}: {err}") from err
    else:
        size, _, variant = (spec or "0.5b").partition(":")
        cfg = preset(size.strip().lower(), variant.strip() or "grid_manager")
    return cfg.replace(dtype=dtype, param_dtype=dtype) if dtype else cfg


def compile_generate_for_topology(cfg: ModelConfig, topology: str, *, mesh: str | None = None,
                                  workload: GenerateWorkload = GenerateWorkload(),
                                  decode_scan_layers: bool = False, decode_command_buffers: bool = False,
                                  decode_multi_output_fusion: bool = False,
                                  compiler_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Compiles prefill and the decode loop of `cfg` for `topology`; returns a report dict.
    `compiler_options`: more XLA options for every program (`InferenceEngine.compile_generate`)."""
    devices = topology_devices(topology)
    with building_for(devices):  # the engine's "auto" choices follow the devices, not this host
        return _compile_generate(cfg, topology, devices, mesh, workload, decode_scan_layers, decode_command_buffers,
                                 decode_multi_output_fusion, compiler_options)


def _compile_generate(cfg, topology, devices, mesh, workload, decode_scan_layers, decode_command_buffers,
                      decode_multi_output_fusion, compiler_options) -> dict[str, Any]:
    device_mesh = mesh_from_spec(mesh, devices) if mesh else mesh_from_spec("fsdp=-1", devices)
    cfg = cfg.runnable_on(devices[0].platform)  # as `generate` loads the checkpoint there
    model = nnx.eval_shape(lambda: LlavaOV(cfg, rngs=nnx.Rngs(0)))
    engine = InferenceEngine(model, mesh=device_mesh, decode_scan_layers=decode_scan_layers,
                             decode_command_buffers=decode_command_buffers,
                             decode_multi_output_fusion=decode_multi_output_fusion)
    prepared = engine.prepare(workload.prompts(cfg.text.vocab_size))
    params = SamplingParams(max_new_tokens=workload.new_tokens)
    kind = devices[0].device_kind
    params_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    report: dict[str, Any] = {
        "model": f"{cfg.text.num_layers} text layers, width {cfg.text.hidden_size}, {cfg.dtype}",
        "topology": topology, "device_kind": kind, "devices": len(devices), "mesh": dict(device_mesh.shape),
        "workload": dataclasses.asdict(workload),
        "prompt_slots": prepared.prompt_slots, "cache_slots": prepared.prompt_slots + engine.new_slots(prepared, params),
        "params_gib": params_bytes / 2**30, "decode": "scanned layers" if decode_scan_layers else "unrolled layers",
        "decode_attention": engine.decode_attention, "decode_rows": max(workload.rows, engine.decode_min_rows),
        "decode_check_every": engine.decode_check_every, "decode_command_buffers": engine.decode_command_buffers,
        "decode_multi_output_fusion": engine.decode_multi_output_fusion,
    }
    report["hbm_per_chip_gib"], report["capacity"] = memory_capacity(kind)
    t0 = time.perf_counter()
    compiled, oom = compile_or_refusal(
        lambda: engine.compile_generate(prepared, params, compiler_options=compiler_options),
        f"the prefill and decode programs ({report['model']})", topology, devices)
    if oom is None and workload.score_tokens:
        requests = workload.score_requests(cfg.text.vocab_size)
        compiled["score"], oom = compile_or_refusal(
            lambda: engine.compile_score(requests, compiler_options=compiler_options),
            f"the score program ({report['model']})", topology, devices)
    if oom is not None:
        return {**report, "compile_s": time.perf_counter() - t0, "programs": None, "fits": False,
                "refused_needs_gib": oom[0], "hbm_per_chip_gib": oom[1]}
    platform = devices[0].platform
    programs = {name: memory_per_chip(compiled[name], platform) for name in PROGRAMS if name in compiled}
    fits = fits_chip(platform, [p and p["total_gib"] for p in programs.values()], report["hbm_per_chip_gib"])
    return {**report, "compile_s": time.perf_counter() - t0, "programs": programs, "fits": fits}


def format_generate_report(report: dict[str, Any]) -> str:
    w = report["workload"]
    lines = [
        f"model: {report['model']}, params {report['params_gib']:.2f} GiB",
        f"on {report['topology']} ({report['devices']} x {report['device_kind']}), mesh {report['mesh']}",
        f"workload: {w['rows']} prompt(s) of a {w['image_size'][0]}x{w['image_size'][1]} image + "
        f"{w['prompt_tokens']} text tokens ({report['prompt_slots']} slots), {w['new_tokens']} new tokens, "
        f"{w['score_tokens']} scored; "
        f"cache {report['cache_slots']} slots; decode with {report['decode']}, {report['decode_attention']} "
        f"attention, {report['decode_rows']} rows, the end checked every "
        + ("token" if report["decode_check_every"] == 1 else f"{report['decode_check_every']} tokens"),
    ]
    if report["programs"] is None:
        lines.append(f"after {report['compile_s']:.1f} s {refused_line(report)}")
        return "\n".join(lines)
    lines.append(f"compiled in {report['compile_s']:.1f} s; memory per chip:")
    for name, mem in report["programs"].items():
        if mem is None:
            lines.append(f"  {name:8s} not reported by this backend")
            continue
        lines.append(f"  {name:8s} {memory_line(mem)}")
    if report["fits"] is not None:
        lines.append(f"of {report['capacity']} -> " + ("fits" if report["fits"] else "DOES NOT FIT"))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="run.py compile-generate", description=__doc__.split("\n\n")[0])
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", default="0.5b:grid_manager",
                       help=f"preset size[:variant]: sizes 0.5b, 7b, 72b; variants {', '.join(VARIANTS)} (default: 0.5b:grid_manager)")
    which.add_argument("--checkpoint", default=None,
                       help="take the model config of this checkpoint directory instead (no weights are read)")
    p.add_argument("--topology", required=True, help=TOPOLOGY_HELP)
    p.add_argument("--mesh", default=None, help="like 'tensor=8' or 'data=2,tensor=4' (default: fsdp over all devices)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="params and compute dtype (default: bfloat16)")
    p.add_argument("--rows", type=int, default=1, help="prompts decoded together (default: 1)")
    p.add_argument("--image-size", type=image_size, default=(768, 768), metavar="WxH",
                   help="size of the generated image of each prompt (default: 768x768)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="text tokens per prompt besides the image (default: 64)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens decoded per prompt (default: 128)")
    p.add_argument("--score-tokens", type=int, default=16,
                   help="also compile scoring a continuation of this many tokens after each prompt (0: skip; default: 16)")
    p.add_argument("--decode-scan-layers", action="store_true",
                   help="scan the decoder layers while decoding (no second copy of the decoder weights)")
    p.add_argument("--decode-command-buffers", action="store_true",
                   help="GPU: the decode loop's loops in CUDA graphs (InferenceEngine decode_command_buffers)")
    p.add_argument("--decode-multi-output-fusion", action="store_true",
                   help="GPU: each layer's residual add and the next RMSNorm in one kernel "
                        "(InferenceEngine decode_multi_output_fusion)")
    p.add_argument("--log-level", default="INFO", type=log_level, help=LOG_LEVEL_HELP)
    args = p.parse_args(argv)
    setup_logging(args.log_level)
    if min(args.rows, args.prompt_tokens, args.new_tokens) < 1 or args.score_tokens < 0:
        p.error("--rows, --prompt-tokens and --new-tokens must be >= 1, --score-tokens >= 0")
    cache_compiled_programs(args.topology)
    try:
        cfg = model_config(args.model, args.dtype, args.checkpoint)
        report = compile_generate_for_topology(
            cfg, args.topology, mesh=args.mesh, decode_scan_layers=args.decode_scan_layers,
            decode_command_buffers=args.decode_command_buffers,
            decode_multi_output_fusion=args.decode_multi_output_fusion,
            workload=GenerateWorkload(args.rows, args.image_size, args.prompt_tokens, args.new_tokens,
                                      args.score_tokens),
        )
    except (AotError, ConfigError, MeshSpecError, InputError) as err:  # InputError: the engine's refusals (mesh, prompt length)
        if args.log_level.upper() == "DEBUG":
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return exit_status.BAD_INPUT
    print(format_generate_report(report))
    return exit_status.FAILED if report["fits"] is False else exit_status.OK
