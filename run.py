"""manager_jax command line.

    python run.py train --config configs/demo.py [--set key=value ...]
    python run.py compile --config configs/llava_ov.py:stage2_grid_manager_7b --topology v5p:2x2x2
    python run.py compile-generate --model 72b:grid_manager --topology v5p:2x2x2 --mesh tensor=8
    python run.py inspect-data ...        (manager_jax.data.inspect)
    python run.py generate|score ...      (manager_jax.infer.cli)

`train` is the same command on one CPU, one GPU, a GPU cluster or every host of a TPU pod.
Subcommands import their modules lazily, so one missing part of the package only breaks itself.
Exit statuses: `manager_jax/exit_status.py` (0 done, 1 failed, 2 bad input, 130 Ctrl-C, 143 preempted).
Compiled programs are kept in a persistent cache (`manager_jax/platform.py`; JAX_COMPILATION_CACHE_DIR
sets the folder, empty turns it off).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence

from manager_jax import exit_status
from manager_jax.log_setup import LOG_LEVEL_HELP, log_level, setup_logging

# The demo recipe is the default, wherever run.py is started from.
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo.py")


def _lazy(module: str, function: str) -> Callable[[Sequence[str]], int | None]:
    """The entry function `module.function`, with a clear error when the module is missing."""
    try:
        mod = importlib.import_module(module)
    except ImportError as err:
        raise SystemExit(f"error: this subcommand needs {module}, which cannot be imported: {err}") from err
    fn = getattr(mod, function, None)
    if fn is None:
        raise SystemExit(f"error: {module} has no entry function {function}()")
    return fn


def _train_parser(prog: str, aot: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Train a model from a recipe." if not aot else
                                "Compile the train step ahead of time for a TPU slice or GPU cluster (on a CPU host).")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="recipe file (path or path:recipe_name); default: configs/demo.py")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (nested with dots); repeatable")
    if aot:
        from manager_jax.train.aot import TOPOLOGY_HELP

        p.add_argument("--topology", required=True, help=TOPOLOGY_HELP)
        p.add_argument("--hlo-out", metavar="PATH",
                       help="also write the compiled program's HLO text there (read it with benchmarks/hlo_traffic.py)")
    p.add_argument("--log-level", default="INFO", type=log_level, help=LOG_LEVEL_HELP)
    return p


def cmd_train(argv: Sequence[str]) -> int:
    args = _train_parser("run.py train", aot=False).parse_args(argv)
    # Outside the training steps (imports, data, model init, the last save's wait), where the loop's
    # handler that stops after a step is not installed, SIGTERM / SIGHUP exit through the cleanup
    # (the run lock released, no temporary file left) with 128 + the signal: killed by it, a
    # scheduler saw a signal death and the temporary files stayed.
    with exit_status.ExitOnSignal():
        try:
            return _train(args)
        except SystemExit as err:
            if err.code in [128 + s for s in exit_status.EXIT_SIGNALS]:
                name = signal.Signals(err.code - 128).name
                print(f"error: stopped by {name} outside the training steps; the next launch resumes from the last "
                      "complete checkpoint", file=sys.stderr)
            raise


def _train(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    from manager_jax import distributed
    from manager_jax.platform import use_compilation_cache
    from manager_jax.train.recipe import load_recipe

    from manager_jax.train.loop import TrainingError, format_throughput, input_errors, train
    from manager_jax.train.run_files import WriteFailed

    def run() -> int:
        distributed.initialize()  # before any JAX computation; a no-op for one process
        use_compilation_cache()
        result = train(load_recipe(args.config, args.overrides))
        if result.losses:
            print(f"first loss {result.losses[0]:.4f}  final loss {result.losses[-1]:.4f}  "
                  f"(steps {result.first_step + 1}..{result.last_step}, {result.status})")
        if result.throughput:
            print(format_throughput(result.throughput) + " (the steps after the first, which compiles)")
        print(f"checkpoint: {result.checkpoint_dir}")
        if result.stop_signal:  # a preempted run is not finished: nonzero, so that a scheduler relaunches it
            name = "Ctrl-C" if result.stop_signal == signal.SIGINT else signal.Signals(result.stop_signal).name
            print(f"stopped by {name} after step {result.last_step}; the next launch resumes from its checkpoint "
                  f"(exit status {128 + result.stop_signal})")
            return 128 + result.stop_signal
        return 0

    # OSError: the environment failed the run (a full disk, a lost mount); a missing input file is
    # FileNotFoundError, among the input errors, which are matched first.
    return _reporting_errors(run, args.log_level, bad_input=input_errors(), failed=(TrainingError, WriteFailed, OSError))


def cmd_compile(argv: Sequence[str]) -> int:
    parser = _train_parser("run.py compile", aot=True)
    args = parser.parse_args(argv)
    if args.hlo_out:  # found before the compile (minutes), not when its text is written
        folder = os.path.dirname(os.path.abspath(args.hlo_out))
        if os.path.isdir(args.hlo_out) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            parser.error(f"--hlo-out {args.hlo_out!r}: needs a file path in an existing, writable folder")
    setup_logging(args.log_level)
    from manager_jax.train.aot import AotError, cache_compiled_programs, compile_for_topology, format_report
    from manager_jax.train.recipe import load_recipe

    from manager_jax.train.loop import input_errors

    def run() -> int:
        cache_compiled_programs(args.topology)
        report = compile_for_topology(load_recipe(args.config, args.overrides), args.topology, hlo_out=args.hlo_out)
        print(format_report(report))
        if args.hlo_out and report.get("refused_needs_gib") is None:
            print(f"HLO: {args.hlo_out}")
        return exit_status.FAILED if report["fits"] is False else exit_status.OK  # a launch script can stop on it

    return _reporting_errors(run, args.log_level, bad_input=(AotError, *input_errors()))


def _reporting_errors(run: Callable[[], int], log_level: str, *, bad_input: tuple, failed: tuple = ()) -> int:
    """`run()`, with the project's own errors printed as one `error:` line and the exit status of
    `manager_jax.exit_status`. The traceback only with --log-level DEBUG."""
    try:
        return run()
    except (*bad_input, *failed, KeyboardInterrupt) as err:
        if log_level.upper() == "DEBUG":
            traceback.print_exc()
        if isinstance(err, KeyboardInterrupt):
            print(f"error: interrupted{f' ({err})' if str(err) else ''}", file=sys.stderr)
            return exit_status.INTERRUPTED
        print(f"error: {err}", file=sys.stderr)
        return exit_status.BAD_INPUT if isinstance(err, bad_input) else exit_status.FAILED


COMMANDS: dict[str, tuple[Callable[[], Callable[[Sequence[str]], int | None]], str]] = {
    "train": (lambda: cmd_train, "train from a recipe"),
    "compile": (lambda: cmd_compile, "AOT-compile the train step for a TPU slice or GPU cluster"),
    "compile-generate": (lambda: _lazy("manager_jax.infer.aot", "main"),
                         "AOT-compile generation (prefill + decode) and scoring for a TPU slice or GPUs"),
    "inspect-data": (lambda: _lazy("manager_jax.data.inspect", "main"),
                     "show what each data record becomes, and why records are skipped"),
    "generate": (lambda: _lazy("manager_jax.infer.cli", "generate_main"), "generate text for images + prompts"),
    "score": (lambda: _lazy("manager_jax.infer.cli", "score_main"), "score continuations (log-likelihood)"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:17s} {help_text}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return exit_status.BAD_INPUT
    from manager_jax.platform import only_cpu_with_libtpu, widen_cpu_thread_pools

    # Both before any command starts the backend: fake CPU devices can deadlock otherwise, and an
    # installed libtpu on a host without accelerators prints a false error.
    widen_cpu_thread_pools()
    if only_cpu_with_libtpu():
        import jax

        jax.config.update("jax_platforms", "cpu")
    from manager_jax.distributed import exit_on_failure

    try:
        result = int(COMMANDS[name][0]()(rest) or 0)
    except KeyboardInterrupt:  # every command: Ctrl-C is one line and 130, as train's and convert's own
        print("error: interrupted", file=sys.stderr)
        return exit_status.INTERRUPTED
    except Exception as err:  # a bug or an unexpected error: its traceback, then the other processes stop too
        traceback.print_exc()
        # Last, as every command's errors: e.g. a collective whose peer process died.
        print(f"error: {type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}", file=sys.stderr)
        exit_on_failure(exit_status.FAILED)
        return exit_status.FAILED
    if result in (exit_status.FAILED, exit_status.BAD_INPUT):
        # Several processes: the others may wait for this one in a collective; they stop too.
        exit_on_failure(result)
    return result


if __name__ == "__main__":
    sys.exit(main())
