"""`run.py generate` and `run.py score`.

  python run.py generate --checkpoint DIR [--tokenizer DIR] --image PATH [--image PATH ...] \\
      --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-p P] [--top-k K] [--json]
  python run.py generate --checkpoint DIR --prompts FILE.jsonl [--batch-size N] [--json]
      [--output ANSWERS.jsonl [--skip-bad]]
  python run.py score --checkpoint DIR [--tokenizer DIR] [--image PATH ...] --prompt TEXT \\
      --continuation TEXT [--json]

Prompts are wrapped in the qwen_1_5 evaluation template (SPEC §4); several images per prompt use
pad mode (SPEC §7.2). In a JSONL file each line is {"prompt": str, "images": [path, ...]}; relative
image paths are resolved against the JSONL file's directory, an optional "id" is copied into
the answer. With --output the answers go to a resumable file (`prompt_file.py`). With --json, generate prints one
{"text", "token_ids", "finish_reason"} object per prompt and line; score prints
{"logprob", "num_tokens", "is_greedy"} where logprob is the sum of the log-probabilities of the
continuation's tokens (not the original adapter's mean loss, SPEC §7.2).

Several hosts: run the same command on every host with --mesh, and JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID set (or on a cluster that jax.distributed detects). The mesh
spans every host's devices, the parameters are restored straight into their shards, and process 0
prints (and alone writes --output).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Sequence

import numpy as np

from manager_jax import exit_status
from manager_jax.config import ConfigError
from manager_jax.data.conversation import build_eval_prompt
from manager_jax.infer.engine import InferenceEngine, InputError
from manager_jax.log_setup import LOG_LEVEL_HELP, log_level, setup_logging
from manager_jax.models.decode_attention import parse_kernel_configs
from manager_jax.models.decode_matmul import parse_matmul_configs
from manager_jax.infer.loading import (
    CheckpointError,
    ImageLoadError,
    MeshSpecError,
    default_vocab_limit,
    load_image,
    load_model,
    mesh_from_spec,
    params_dir_to_load,
    read_eos_ids,
    read_repetition_penalty,
    read_sampling_defaults,
)
from manager_jax.infer.prompt_file import AnswerFile, PromptLine, answer_record, check_images, read_prompts
from manager_jax.infer.requests import generation_prompt, score_request
from manager_jax.infer.sampling import SamplingParams

# Problems of the user's input: reported in one line, without a traceback (exit status 2).
USER_ERRORS = (FileNotFoundError, CheckpointError, ImageLoadError, InputError, ConfigError, MeshSpecError)


def _start_processes() -> None:
    """Several processes (JAX_* variables or a detected cluster): one global mesh. Before any input
    is read, so that the processes can agree on it (`_agreed`)."""
    from manager_jax import distributed

    try:
        distributed.initialize()
    except distributed.DistributedSetupError as err:
        raise InputError(str(err)) from None


# How long a process whose step failed waits for the others at the vote after it. They may never
# come: a step with collectives inside (the model's restore) holds them there, waiting for this one.
FAILED_VOTE_WAIT_S = 30.0


def _agreed(step):
    """step() on this process; a user error on any process stops every one (each raises), before
    the next step's collectives: a process alone in them would wait for its peers until it times out.

    A process whose step failed and whose peers do not come to the vote raises its error anyway;
    run.py's `distributed.exit_on_failure` then stops them wherever they wait."""
    from manager_jax.distributed import any_process

    error = result = None
    try:
        result = step()
    except USER_ERRORS as err:
        error = err
    try:
        refused = any_process((error is not None,), **({"timeout_s": FAILED_VOTE_WAIT_S} if error else {}))[0]
    except RuntimeError:
        if error is None:
            raise
        raise error from None
    if refused:
        raise error or InputError("another process refused its input (its error says why)")
    return result


def _common_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--checkpoint", required=True, help="params directory or training checkpoint directory")
    p.add_argument("--tokenizer", default=None,
                   help="local HF tokenizer directory (default: the checkpoint's tokenizer/ if present, "
                        "else the offline Qwen2 tokenizer)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute and parameter dtype (default: the checkpoint config's)")
    p.add_argument("--max-length", type=int, default=None,
                   help="longest prompt + answer in tokens, >= 1 (default: the model's max_position_embeddings)")
    p.add_argument("--vocab-limit", type=int, default=None,
                   help="never produce / normalise over ids >= this (default: the tokenizer's vocabulary "
                        "without <image>/<video>, as the original evaluation; -1 = the whole model vocabulary; "
                        "generate needs it above the eos ids)")
    p.add_argument("--mesh", default=None,
                   help="shard over the devices (every host's in a multi-process run), e.g. 'fsdp=-1' or "
                        "'data=2,tensor=4' (or 'data:2/tensor:4'; default: one device)")
    p.add_argument("--decode-attention", default="auto", choices=["auto", "xla", "pallas"],
                   help="attention of the decode steps: XLA's, or two fused GPU kernels per layer (per device on a "
                        "mesh; off the GPU it is interpreted, for tests only); auto: the kernels on GPUs, XLA's elsewhere")
    p.add_argument("--decode-kernels", default="", metavar="ROWS:B,P,W,S[,PEEL];...",
                   help="the fused kernels' division of the work by rows decoded together, as "
                        "benchmarks/decode_attention.py prints the fastest (speed only; default: built in)")
    p.add_argument("--decode-matmul", default="xla", choices=["xla", "pallas"],
                   help="projections of the decode steps: XLA's, or four fused GPU kernels per layer with the norms, "
                        "residual adds and gate inside (with the fused attention kernels, on one device)")
    p.add_argument("--decode-matmul-kernels", default="", metavar="SITE=N,K,W,S;...",
                   help="their configs by projection (qkv, o, gate_up, down), as benchmarks/decode_matmul.py prints "
                        "the fastest (speed only; default: built in)")
    p.add_argument("--decode-command-buffers", action="store_true",
                   help="GPU: run the decode loop's loops in CUDA graphs, their end tested on the GPU (speed only)")
    p.add_argument("--decode-multi-output-fusion", action="store_true",
                   help="GPU: compile the decode steps with each layer's residual add and the next layer's RMSNorm "
                        "in one kernel (XLA's multi-output Triton fusions; speed only)")
    p.add_argument("--log-level", default="INFO", type=log_level, help=LOG_LEVEL_HELP)
    return p


def _tokenizer_path(args) -> str | None:
    if args.tokenizer:
        return args.tokenizer
    bundled = os.path.join(args.checkpoint, "tokenizer")
    return bundled if os.path.isdir(bundled) else None


def check_common_args(parser: argparse.ArgumentParser, args) -> None:
    """Usage errors (exit 2) in the options `_common_parser` adds; then the logging set up."""
    if args.max_length is not None and args.max_length < 1:
        parser.error(f"--max-length must be >= 1 (omit it for the model's maximum), got {args.max_length}")
    if args.vocab_limit is not None and args.vocab_limit < 1 and args.vocab_limit != -1:
        parser.error(f"--vocab-limit must be >= 1, or -1 for the whole vocabulary, got {args.vocab_limit}")
    setup_logging(args.log_level)


def _bad_input(err: Exception, args) -> int:
    """A user error as one `error:` line (its traceback too with --log-level DEBUG): exit status 2."""
    if args.log_level == "DEBUG":
        traceback.print_exception(err)
    print(f"error: {err}", file=sys.stderr)
    return exit_status.BAD_INPUT


def build_engine(args, generating: bool = True) -> tuple[InferenceEngine, object]:
    """Model, tokenizer and engine from the common command-line options (`generating`: the eos ids
    must lie inside the vocab limit)."""
    from manager_jax.data.tokenizer import load_tokenizer
    from manager_jax.platform import use_compilation_cache

    try:
        decode_kernels = parse_kernel_configs(args.decode_kernels)
    except ValueError as err:
        raise InputError(f"--decode-kernels: {err}") from None
    try:
        matmul_kernels = parse_matmul_configs(args.decode_matmul_kernels)
    except ValueError as err:
        raise InputError(f"--decode-matmul-kernels: {err}") from None
    _start_processes()
    use_compilation_cache()

    def mesh_and_tokenizer():
        mesh = mesh_from_spec(args.mesh)
        tokenizer_path = _tokenizer_path(args)
        try:  # before the (slow) model load
            return mesh, load_tokenizer(tokenizer_path)
        except (OSError, ValueError, TypeError, KeyError) as err:  # transformers' many ways to fail on a bad folder
            raise InputError(f"cannot load the tokenizer from {tokenizer_path!r}: {type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}") from err

    mesh, tokenizer = _agreed(mesh_and_tokenizer)  # the model load restores across the processes
    model = load_model(args.checkpoint, dtype=args.dtype, mesh=mesh)
    vocab = model.cfg.text.vocab_size
    if args.vocab_limit is None:
        limit = default_vocab_limit(tokenizer, vocab)
    else:
        limit = vocab if args.vocab_limit == -1 else min(args.vocab_limit, vocab)
    eos_ids = read_eos_ids(args.checkpoint, tokenizer.eos_ids)
    if generating and any(e >= limit for e in eos_ids):
        raise InputError(f"--vocab-limit {args.vocab_limit} excludes the eos ids {eos_ids}: answers could never end; "
                         f"use at least {max(eos_ids) + 1} (or -1 for the whole vocabulary)")
    try:
        engine = InferenceEngine(
            model, eos_ids=eos_ids, pad_id=tokenizer.pad_id,
            im_start_id=tokenizer.im_start_id, vocab_limit=limit, max_length=args.max_length, mesh=mesh,
            decode_attention=args.decode_attention, decode_kernels=decode_kernels, decode_matmul=args.decode_matmul,
            decode_matmul_kernels=matmul_kernels, decode_command_buffers=args.decode_command_buffers,
            decode_multi_output_fusion=args.decode_multi_output_fusion,
        )
    except ValueError as err:  # options that do not go together (e.g. the fused projections without the attention kernels)
        raise InputError(str(err)) from None
    return engine, tokenizer


def generate_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `run.py generate`; returns the exit status."""
    p = _common_parser("run.py generate", "Generate answers with a LLaVA-OV(-Manager) checkpoint.")
    p.add_argument("--image", action="append", default=[], help="image file (repeat for several images)")
    p.add_argument("--prompt", default=None, help="the question (wrapped in the qwen_1_5 template)")
    p.add_argument("--prompts", default=None,
                   help='JSONL file: {"prompt": str, "images": [path, ...], "id": optional} per line (blank lines '
                        "skipped; relative image paths resolve against the file's directory); every line is checked "
                        "before the first answer, and a bad one refuses the file (see --skip-bad)")
    p.add_argument("--max-new-tokens", type=int, default=128,
                   help="most tokens per answer (default: 128; fewer when the prompt leaves less room below "
                        "--max-length)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), else sampling (finite, > 0)")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling mass in (0, 1], 1 = off (default, as HF generate: the checkpoint's "
                        "generation_config.json value, else 1)")
    p.add_argument("--top-k", type=int, default=None,
                   help="0 = off (default, as HF generate: the checkpoint's generation_config.json value, else 50)")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="HF repetition penalty on the generated ids (default: the checkpoint's "
                        "generation_config.json value, else 1.0 = off)")
    p.add_argument("--seed", type=int, default=0,
                   help="sampling seed (default: 0); prompt i of a --prompts file draws from its own stream of it, "
                        "whatever --batch-size")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch in --prompts mode (default: 8)")
    p.add_argument("--json", action="store_true",
                   help='print one JSON object per prompt: {"text", "token_ids", "finish_reason": "eos"|"length"}')
    p.add_argument("--output", default=None, metavar="FILE.jsonl",
                   help="--prompts mode: append the answers to this file instead of printing them, one JSON line "
                        "per prompt, synced batch by batch; run again with the same options to resume after its "
                        "last complete line")
    p.add_argument("--skip-bad", action="store_true",
                   help="--prompts mode with --output: a bad line (not JSON, no prompt, an unreadable image, too long) "
                        "is skipped and listed in the output with its reason, instead of refusing the whole file")
    args = p.parse_args(argv)
    check_common_args(p, args)
    if (args.prompt is None) == (args.prompts is None):
        p.error("give exactly one of --prompt and --prompts")
    if args.prompts is not None and args.image:
        p.error("--image goes with --prompt; in --prompts mode list images in the JSONL file")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if args.prompts is None and (args.output is not None or args.skip_bad):
        p.error("--output and --skip-bad go with --prompts")
    if args.skip_bad and args.output is None:
        p.error("--skip-bad lists the skipped lines in the --output file: give --output")
    try:
        config_dir = args.checkpoint if os.path.isdir(args.checkpoint) else None
        penalty = args.repetition_penalty
        if penalty is None:
            penalty = read_repetition_penalty(config_dir)
        # --temperature T alone samples as HF generate(do_sample=True, temperature=T) does.
        defaults = read_sampling_defaults(config_dir)
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=defaults["top_p"] if args.top_p is None else args.top_p,
                                top_k=defaults["top_k"] if args.top_k is None else args.top_k,
                                seed=args.seed, repetition_penalty=penalty)
    except CheckpointError as e:  # a damaged generation_config.json: bad input, not a usage error
        return _bad_input(e, args)
    except ValueError as e:  # SamplingParams starts with its field's name: name the flag instead
        field, _, rest = str(e).partition(" ")
        p.error(f"--{field.replace('_', '-')} {rest}")
    try:
        from manager_jax import distributed

        _start_processes()
        answers = None
        if args.output is not None:
            tokenizer_path = _tokenizer_path(args)
            answers = AnswerFile(args.output, {
                "checkpoint": _weights_named(args.checkpoint),
                "tokenizer": tokenizer_path and os.path.realpath(tokenizer_path),
                "dtype": args.dtype, "max_length": args.max_length, "vocab_limit": args.vocab_limit,
                **dataclasses.asdict(params)})

        def read_items():  # the prompts file, and the answers already written (process 0 writes them)
            if args.prompt is not None:
                return [PromptLine("--prompt", 0, text=args.prompt, paths=args.image)], 0
            lines = read_prompts(args.prompts, args.skip_bad)
            return lines, answers.resume(lines) if answers is not None and distributed.is_primary() else 0

        items, done = _agreed(read_items)
        done = _from_process_0(done)
        items = items[done:]
        progress = _Progress(len(items) + done, done, args.prompts is not None and distributed.is_primary())
        if not items:  # a finished run relaunched: nothing to load the model for
            progress.summary()
            return 0
        # Every image and placeholder count, before the (slow) model load.
        _agreed(lambda: check_images(items, args.skip_bad))
        _agree_on_skips(items)
        engine = tokenizer = None
        if any(line.error is None for line in items):  # else nothing to load the model for
            engine, tokenizer = _agreed(lambda: build_engine(args))
            _agreed(lambda: _check_lengths(engine, tokenizer, items, args.skip_bad))  # before the first batch
            _agree_on_skips(items)
        if answers is not None:  # a vote on every process: process 0's refusal stops them all
            _agreed(lambda: answers.open() if distributed.is_primary() else None)
        try:
            for span, good in _batches(items, args.batch_size):
                # Images are decoded batch by batch; prompt i draws from stream i.
                prompts = [generation_prompt(line.text, [load_image(p) for p in line.paths], tokenizer)
                           for line in good]
                gens = dict(zip((line.index for line in good),
                                engine.generate(prompts, params, streams=[line.index for line in good]) if good else []))
                if not distributed.is_primary():  # every process of a multi-host run holds the same answers
                    continue
                texts = {i: tokenizer.decode(g.token_ids, skip_special_tokens=True).strip() for i, g in gens.items()}
                if answers is not None:
                    answers.append([answer_record(line, texts.get(line.index), gens.get(line.index)) for line in span])
                else:
                    for line in good:
                        _print_generation(gens[line.index], texts[line.index], line.index, args.json,
                                          single=args.prompt is not None)
                progress.update(span, gens.values())
        finally:
            if answers is not None:
                answers.close()
        progress.summary()
        if not done and all(line.error is not None for line in items):
            # --skip-bad kept the run going, but a file with no answer at all is a failed run.
            print(f"error: every one of the {len(items)} lines of {args.prompts} was skipped; "
                  f"{args.output} lists each with its cause", file=sys.stderr)
            return exit_status.FAILED
    except USER_ERRORS as e:
        return _bad_input(e, args)
    return 0


def _weights_named(checkpoint: str) -> str:
    """What an answers file records of --checkpoint: the step directory the model loads, not the
    run's folder, so that answers of a later step are not mixed in. A checkpoint that cannot be
    resolved is named as given: the model load reports it, if any line needs the model."""
    try:
        return params_dir_to_load(checkpoint)
    except CheckpointError:
        return os.path.realpath(checkpoint)


def _from_process_0(value: int) -> int:
    """Process 0's value on every process (it alone reads the --output file)."""
    import jax

    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def _check_lengths(engine, tokenizer, lines: list[PromptLine], skip_bad: bool) -> None:
    """Every prompt's length after image expansion, with room for an answer (from the images' sizes)."""
    for line in lines:
        if line.error is None:
            try:
                engine.check_prompt(build_eval_prompt(line.text, len(line.sizes), tokenizer), line.sizes, line.where)
            except InputError as e:
                if not skip_bad:
                    raise
                line.error = str(e)


def _agree_on_skips(lines: list[PromptLine]) -> None:
    """A line skipped on one process is skipped on every one: the batches must be the same everywhere."""
    from manager_jax.distributed import any_process

    for line, bad in zip(lines, any_process([line.error is not None for line in lines])):
        if bad and line.error is None:
            line.error = "refused on another process (its images differ there)"


def _batches(lines: list[PromptLine], batch_size: int):
    """(span, good): the lines in order up to and including the batch_size-th line to answer, and
    those to answer; the skipped ones in between are written in their place."""
    span: list[PromptLine] = []
    for line in lines:
        span.append(line)
        if sum(item.error is None for item in span) == batch_size:
            yield span, [item for item in span if item.error is None]
            span = []
    if span:
        yield span, [item for item in span if item.error is None]


class _Progress:
    """--prompts runs: prompts done / total and tokens per second on stderr, at most every
    PROGRESS_EVERY_S seconds, and a summary at the end."""

    def __init__(self, total: int, resumed: int, show: bool):
        self.total, self.resumed, self.show = total, resumed, show
        self.done, self.skipped, self.tokens = resumed, 0, 0
        self.finish = {"eos": 0, "length": 0}
        self.start = self.last = time.monotonic()
        if show and resumed:
            print(f"generate: resuming after {resumed} of {total} prompts already in the output", file=sys.stderr,
                  flush=True)

    def _rate(self) -> str:
        elapsed = time.monotonic() - self.start
        return f"{self.tokens} tokens in {elapsed:.1f} s ({self.tokens / max(elapsed, 1e-9):.1f} tokens/s)"

    def update(self, span, gens) -> None:
        self.done += len(span)
        self.skipped += sum(line.error is not None for line in span)
        for gen in gens:
            self.tokens += len(gen.token_ids)
            self.finish[gen.finish_reason] = self.finish.get(gen.finish_reason, 0) + 1
        now = time.monotonic()
        if self.show and self.done < self.total and now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            print(f"generate: {self.done}/{self.total} prompts, {self._rate()}", file=sys.stderr, flush=True)

    def summary(self) -> None:
        if self.show:
            finish = ", ".join(f"{k} {v}" for k, v in self.finish.items())
            print(f"generate: done, {self.total} prompts ({self.resumed} from before, {self.skipped} skipped, "
                  f"{self.done - self.resumed - self.skipped} answered: {finish}), {self._rate()}",
                  file=sys.stderr, flush=True)


PROGRESS_EVERY_S = 10.0


def _print_generation(gen, text: str, index: int, as_json: bool, single: bool) -> None:
    if as_json:
        print(json.dumps({"text": text, "token_ids": gen.token_ids, "finish_reason": gen.finish_reason},
                         ensure_ascii=False, allow_nan=False), flush=True)
    elif single:
        print(text)
    else:
        print(f"### {index}\n{text}", flush=True)


def score_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `run.py score`; returns the exit status."""
    p = _common_parser("run.py score", "Log-likelihood of a continuation given a prompt (and images).")
    p.add_argument("--image", action="append", default=[], help="image file (repeat for several images)")
    p.add_argument("--prompt", required=True, help="the question / context (wrapped in the qwen_1_5 template)")
    p.add_argument("--continuation", required=True, help="the answer to score (no <image>)")
    p.add_argument("--json", action="store_true",
                   help='print {"logprob": sum of the continuation tokens\' log-probabilities, "num_tokens", '
                        '"is_greedy"}')
    args = p.parse_args(argv)
    check_common_args(p, args)
    try:
        _start_processes()
        images = _agreed(lambda: [load_image(path) for path in args.image])
        engine, tokenizer = _agreed(lambda: build_engine(args, generating=False))
        request = _agreed(lambda: score_request(args.prompt, args.continuation, images, tokenizer))
        if request is None:
            logprob, num_tokens, greedy = 0.0, 0, True
        else:
            result = engine.score([request])[0]
            logprob, num_tokens, greedy = result.logprob, result.num_tokens, result.is_greedy
    except USER_ERRORS as e:
        return _bad_input(e, args)
    from manager_jax import distributed

    if not distributed.is_primary():  # every process of a multi-host run holds the same result
        return 0
    if args.json:  # strict JSON: a log-probability that is not finite is null
        logprob = logprob if math.isfinite(logprob) else None
        print(json.dumps({"logprob": logprob, "num_tokens": num_tokens, "is_greedy": greedy}, allow_nan=False))
    else:
        print(f"logprob {logprob:.6f} over {num_tokens} tokens; greedy: {greedy}")
    return 0


if __name__ == "__main__":  # python -m manager_jax.infer.cli generate|score ...
    command, rest = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    mains = {"generate": generate_main, "score": score_main}
    if command not in mains:
        sys.exit("usage: python -m manager_jax.infer.cli generate|score [options]")
    sys.exit(mains[command](rest))
