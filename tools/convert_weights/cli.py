"""Command line: python -m tools.convert_weights {to-orbax, from-orbax, inspect, verify} ...

Exit status (as every run.py command, manager_jax/exit_status.py): 0 on success; 2 when the
input is rejected (usage errors, or one message listing every problem; nothing written); 1 when
`verify` finds the logits apart, `inspect` cannot read PATH, or a written checkpoint does not read
back; 130 / 143 when interrupted by SIGINT / SIGTERM (the partial output is removed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from manager_jax import cli_types, exit_status
from tools.convert_weights.sources import VARIANTS, ConversionError, ConversionFailed


def _progress(quiet: bool):
    if quiet:
        return None
    start = time.time()
    return lambda msg: print(f"[{time.time() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.convert_weights", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("to-orbax", help="PyTorch checkpoint (or our Orbax checkpoint) -> params directory")
    p.add_argument("paths", nargs="+", metavar="SRC DST",
                   help="SRC DST; SRC is a checkpoint directory, SIGLIP_DIR,QWEN_DIR, a params directory or a "
                        "training checkpoint (latest step). With --siglip/--qwen give DST only.")
    p.add_argument("--format", choices=["llava", "hf", "siglip+qwen2", "orbax"], default=None,
                   help="source format (detected when omitted)")
    p.add_argument("--dtype", choices=["keep", "bf16", "fp32"], default="keep",
                   help="dtype of the stored parameters (keep: as in SRC)")
    p.add_argument("--siglip", help="SigLIP checkpoint directory (siglip+qwen2)")
    p.add_argument("--qwen", help="Qwen2 checkpoint directory (siglip+qwen2)")
    p.add_argument("--variant", choices=VARIANTS, default="baseline",
                   help="siglip+qwen2: Manager / grid settings with their defaults (SPEC §2.1, §8)")
    p.add_argument("--model-config", help="siglip+qwen2: a JSON ModelConfig whose manager/image sections to use")
    p.add_argument("--seed", type=cli_types.seed, default=0, help="siglip+qwen2: seed of the fresh projector/newline/Manager")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DST if it exists (never when DST is, holds or lies inside SRC); a DST that is "
                        "a symlink is written through: its target is replaced, the link kept")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")

    p = sub.add_parser(
        "from-orbax", help="params directory / training checkpoint -> PyTorch safetensors",
        description="Export a params directory (or the latest step of a training checkpoint) as a PyTorch "
                    "safetensors checkpoint with its config.json, written atomically.",
        epilog="Image convention: the Manager checkpoints use the original one (int() unpad rounding, no newline "
               "after single-crop images); transformers' LlavaOnevision always uses its own (round(x, 7) "
               "unpad, a newline after every single-crop image, SPEC §3.9). --format hf of an original-"
               "convention model is refused unless --accept-hf-convention is given; the exported config.json "
               "then records the original convention, so to-orbax gives back the same model, but transformers "
               "itself will preprocess images its way.")
    p.add_argument("src", metavar="SRC", help="params directory, or training checkpoint / output_dir (latest step)")
    p.add_argument("dst", metavar="DST", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--format", choices=["llava", "hf"], required=True,
                   help="llava: the original LLaVA-OV(-Manager) layout and config (mm_* fields); hf: transformers "
                        "LlavaOnevisionForConditionalGeneration names and config (Manager fields kept as extras)")
    p.add_argument("--dtype", choices=["keep", "bf16", "fp32", "fp16"], default="keep",
                   help="dtype of the written tensors (keep: as stored; fp16, what the original evaluates in, "
                        "refuses a value beyond float16's range instead of writing inf)")
    p.add_argument("--tokenizer", help="tokenizer directory whose files are copied into DST (default: the params "
                                       "directory's tokenizer/, else the training run's data.tokenizer_path, else, "
                                       "for a Qwen2 vocabulary, the offline Qwen2 tokenizer)")
    p.add_argument("--hf-naming", choices=["auto", "v5", "legacy"], default="auto",
                   help="hf key names: v5 = transformers 5.x save_pretrained, legacy = 4.4x hub names, auto = the "
                        "source's own if it was an HF checkpoint, else v5")
    p.add_argument("--max-shard-size", default="5GB",
                   help="largest safetensors shard, e.g. 5GB, 500MB, 2GiB or a byte count (default: 5GB)")
    p.add_argument("--accept-hf-convention", action="store_true",
                   help="allow --format hf of a model with the original image convention (see below)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DST if it exists (never when DST is, holds or lies inside SRC or --tokenizer); "
                        "a DST that is a symlink is written through: its target is replaced, the link kept")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")

    p = sub.add_parser("inspect", help="detected format, config and tensors of any supported checkpoint "
                                       "(exit status 1 when PATH cannot be read as one)")
    p.add_argument("path", metavar="PATH", help="checkpoint directory or file, SIGLIP_DIR,QWEN_DIR, params directory "
                                                "or training checkpoint")

    p = sub.add_parser("verify", help="run the PyTorch reference and our model on the same input; compare logits")
    p.add_argument("--torch", required=True, dest="torch_path", help="PyTorch checkpoint (llava or hf)")
    p.add_argument("--jax", required=True, dest="jax_path", help="params directory converted from it")
    p.add_argument("--max-kl", type=cli_types.threshold, default=1e-4, help="fail above this mean KL(torch || jax) per token (default: 1e-4)")
    p.add_argument("--max-logit-diff", type=cli_types.threshold, default=None, help="fail above this max |logit diff| (default: no limit)")
    p.add_argument("--max-rel-error", type=cli_types.threshold, default=1e-4,
                   help="fail above this ||jax - torch|| / ||torch|| of the logits (default: 1e-4; catches wrong "
                        "layouts, e.g. RoPE-permuted q/k rows, that the near-uniform logits of random weights hide from the KL)")
    p.add_argument("--min-top1", type=cli_types.threshold, default=1.0, help="fail below this top-1 agreement (default: 1.0)")
    p.add_argument("--image-size", type=cli_types.image_size, default=(512, 384), metavar="WxH", help="WxH of the generated test image (default: 512x384)")
    p.add_argument("--seed", type=cli_types.seed, default=0, help="seed of the generated test prompt and image (default: 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "to-orbax":
            return _to_orbax(args)
        if args.command == "from-orbax":
            from tools.convert_weights.convert import from_orbax

            files = from_orbax(args.src, args.dst, fmt=args.format, dtype=args.dtype, tokenizer=args.tokenizer,
                               hf_naming=args.hf_naming, max_shard_size=args.max_shard_size,
                               overwrite=args.overwrite, progress=_progress(args.quiet),
                               accept_hf_convention=args.accept_hf_convention)
            print(f"wrote {args.dst}: {', '.join(files)}")
            return 0
        if args.command == "inspect":
            from tools.convert_weights.inspect_ckpt import inspect_report

            report, readable = inspect_report(args.path)
            print(report)
            return exit_status.OK if readable else exit_status.FAILED
        if args.command == "verify":
            from tools.convert_weights.verify import verify_cli

            return verify_cli(args)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_status.FAILED if isinstance(e, ConversionFailed) else exit_status.BAD_INPUT
    except KeyboardInterrupt:  # the partial output has been removed (params_io.write_atomically)
        print("interrupted; nothing written", file=sys.stderr)
        return exit_status.INTERRUPTED
    return exit_status.BAD_INPUT


def _to_orbax(args) -> int:
    from tools.convert_weights.convert import to_orbax

    paths = list(args.paths)
    if args.siglip or args.qwen:
        if not (args.siglip and args.qwen) or len(paths) != 1:
            print("usage error: to-orbax with --siglip/--qwen needs both flags and DST only", file=sys.stderr)
            return exit_status.BAD_INPUT
        src, dst = f"{args.siglip},{args.qwen}", paths[0]
        fmt = args.format or "siglip+qwen2"
    else:
        if len(paths) != 2:
            print("usage error: to-orbax expects SRC DST", file=sys.stderr)
            return exit_status.BAD_INPUT
        src, dst = paths
        fmt = args.format
    model_config = None
    if args.model_config:
        with open(args.model_config) as f:
            model_config = json.load(f)
    cfg = to_orbax(src, dst, fmt=fmt, dtype=args.dtype, overwrite=args.overwrite, seed=args.seed,
                   variant=args.variant, model_config=model_config, progress=_progress(args.quiet))
    print(f"wrote {dst}: {cfg.text.num_layers}-layer Qwen2, {cfg.vision.num_layers}-layer SigLIP, "
          f"manager {cfg.manager.type or 'none'}, {cfg.image.patch_merge_type}")
    return 0
