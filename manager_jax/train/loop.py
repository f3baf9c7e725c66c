"""The training loop: data feed, resume, checkpoints, metrics, SIGTERM / Ctrl-C, non-finite steps.

`train(config)` is what `python run.py train` runs, on one device or on every process of a
multi-host job (call `manager_jax.distributed.initialize()` first).

Data: a step consumes ``grad_accum x batch_shards`` shard batches. Shard k is the data pipeline's
host-share k of ``batch_shards`` (``make_train_iterator(process_index=k, process_count=shards)``);
each process reads only the shards its devices hold and builds global arrays with
``jax.make_array_from_process_local_data``. The data order therefore depends on the recipe only,
not on the number of processes or devices, and a run resumes exactly: the checkpoint holds every
shard's iterator state.

Steps run one ahead: step n+1 is dispatched before step n's metrics are read, so the host's work
between steps overlaps the device's. A non-finite streak therefore aborts one step later, and a
SIGTERM stops after the step that was running when it came. With several processes, what all
must agree on each step (stop, data run out, which loss program) is voted through the coordination
service on the hosts (`distributed.any_process`): a device collective would wait for the step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import statistics
import time
from typing import Any, Callable

import jax

from manager_jax.config import ConfigError, check_attention_impl
from manager_jax.distributed import DistributedSetupError, any_process
from manager_jax.params_io import ParamsError, dotted, restore_failure
from manager_jax.sharding import ShardingError, data_parallel_size, make_mesh
from manager_jax.train import flops as flops_lib
from manager_jax.train import run_files
from manager_jax.train.checkpointing import Checkpointer, CheckpointSaveError, gather_shard_states, saved_run
from manager_jax.train.evaluation import (Evaluator, eval_data_config, format_evaluation, open_eval_source,
                                          synthetic_eval_data)
from manager_jax.train.feed import DataFeed, TrainingError
from manager_jax.train.metrics import MetricsWriter, Progress, memory_record
from manager_jax.train.recipe import RecipeError, TrainConfig, check_inputs, compare_with_saved, resolve_batch_layout
from manager_jax.train.run_lock import RunDirectoryInUse, RunLock
from manager_jax.train.state import (
    TrainSetup,
    abstract_step_batch,
    batch_field_shapes,
    init_params,
    init_state,
    jit_train_step,
    make_setup,
    place_batch,
)
from manager_jax.train.step import LossConfig

logger = logging.getLogger(__name__)


def input_errors() -> tuple[type[Exception], ...]:
    """The errors that mean the run's input is wrong (recipe, model / mesh config, data, params,
    files): `run.py train` and `compile` report them in one line, without a traceback."""
    from manager_jax.data.mixture import MixtureError
    from manager_jax.data.packing import BatchShapeError
    from manager_jax.data.records import RecordFormatError

    return (RecipeError, ConfigError, ShardingError, ParamsError, MixtureError, RecordFormatError, BatchShapeError,
            FileNotFoundError, DistributedSetupError)


@dataclasses.dataclass
class TrainResult:
    """What a call to `train` did."""

    first_step: int  # step the run started from (0, or the restored step)
    last_step: int  # steps completed when it returned
    losses: list[float]  # loss of every step run in this call
    status: str  # "completed" (num_steps reached and saved) | "stopped" (SIGTERM / Ctrl-C / stop_at_step before it) | "data_exhausted"
    checkpoint_dir: str
    state: dict | None = None  # final train state (kept only when asked)
    # The signal that stopped the run (this process's, else SIGTERM: another host's preemption
    # notice); None when it ran to its end or to stop_at_step.
    stop_signal: int | None = None
    # Medians over this call's steps after its first (which compiles): step time, tokens/s, MFU
    # (None without a known peak); empty for a call of one step.
    throughput: dict[str, float | None] = dataclasses.field(default_factory=dict)


# ---- helpers -------------------------------------------------------------------------------------
def _synthetic_data_dir(config: TrainConfig) -> str:
    """Where the demo data set goes (per process: no shared filesystem needed)."""
    sub = "data" if jax.process_count() == 1 else f"data/process_{jax.process_index()}"
    return os.path.join(config.output_dir, sub)


def _prepare_synthetic_data(config: TrainConfig) -> None:
    """Generates the demo data set into the output dir and points `config.data` at it."""
    from manager_jax.data.synthetic import DEFAULT_SIZES, make_synthetic_dataset

    sizes = [tuple(s) for s in config.synthetic_image_sizes] if config.synthetic_image_sizes else DEFAULT_SIZES
    ds = make_synthetic_dataset(
        _synthetic_data_dir(config), num_records=config.synthetic_records, seed=config.data.seed, sizes=sizes
    )
    config.data.data_path = ds.records_path
    config.data.image_folder = ds.image_folder
    config.data.mixture = None


def check_resume(config: TrainConfig, shards: int, num_records: int | None = None, *, log: bool = True) -> int | None:
    """The checkpoint step to resume from (None: a fresh run), after checking that the checkpoints
    in the run's directory belong to this run (`num_records`: of the data it reads, None for the
    generated set, which the config determines). Reads only, so a refused run leaves the directory
    as it was. Raises RecipeError when the directory holds checkpoints that this config cannot continue.
    """
    directory = config.checkpoint_dir()
    steps, saved, data_states = saved_run(directory)
    if not steps:
        return None
    listed = ", ".join(str(s) for s in steps)
    if not config.checkpoint.resume:
        raise RecipeError(
            f"{directory} already holds checkpoints (steps {listed}) and checkpoint.resume=False: training "
            "would overwrite or delete them. Use another output_dir (or checkpoint.dir), or remove them"
        )
    other_run, changed = compare_with_saved(saved, config.to_dict())
    if len(data_states) != shards:
        other_run.append(f"batch_shards (resolved): {len(data_states)} -> {shards} (the data state is kept per shard; "
                         f"--set batch_shards={len(data_states)} keeps the checkpoint's shards on this mesh)")
    saved_records = data_states[0].get("num_records") if data_states and isinstance(data_states[0], dict) else None
    if num_records is not None and saved_records is not None and saved_records != num_records:
        # The data state holds positions in a shuffled order of the saved number of records.
        other_run.append(f"records in {config.data.mixture or config.data.data_path}: {saved_records} -> {num_records} "
                         "(the data changed; its saved position would index another order)")
    if other_run:
        raise RecipeError(
            f"cannot resume {directory} (step {steps[-1]}): this config describes another run than the checkpoint's:\n  - "
            + "\n  - ".join(other_run)
            + "\nUse another output_dir for a new run, or set these fields back to resume this one"
        )
    if changed and log:
        logger.info("resuming with changed settings: %s", "; ".join(changed))
    return steps[-1]


def load_initial_params(setup: TrainSetup, params: dict, init_from: str, strict: bool) -> tuple[dict, list[str]]:
    """Overwrites `params` with the leaves found in the params dirs / checkpoints of `init_from`.

    Returns (params, names of params left at their random init). Shapes must match; stored leaves the
    model does not have are reported and ignored.
    """
    from manager_jax import params_io

    flat_params = params_io.flatten_tree(params)
    flat_abstract = params_io.flatten_tree(setup.abstract_params)
    loaded: set[tuple] = set()
    for directory in [d.strip() for d in init_from.split(",") if d.strip()]:
        item, _ = params_io.resolve_params_dir(directory)
        stored = params_io.flatten_tree(params_io.tree_metadata(item))
        wanted = {}
        for path, meta in stored.items():
            if path not in flat_abstract:
                logger.warning("init_from %s: %s is not a parameter of this model; ignored", directory, dotted(path))
                continue
            target = flat_abstract[path]
            if tuple(meta.shape) != tuple(target.shape):
                raise TrainingError(
                    f"init_from {directory}: {dotted(path)} has shape {tuple(meta.shape)}, the model needs {tuple(target.shape)}"
                )
            wanted[path] = target
        if not wanted:
            raise TrainingError(f"init_from {directory}: no parameter of this model found there")
        try:
            restored = params_io.flatten_tree(params_io.restore_tree(item, _unflatten(wanted), partial=True))
        except Exception as err:  # unreadable or damaged array files
            raise params_io.restore_failure(f"init_from {directory}: cannot restore the parameters", err, item) from err
        for path, value in restored.items():
            flat_params[path] = value
            loaded.add(path)
        logger.info("init_from %s: loaded %d parameters", directory, len(wanted))
    missing = sorted(dotted(p) for p in flat_abstract if p not in loaded)
    if missing and strict:
        raise TrainingError(f"init_strict: {len(missing)} parameters are not in init_from: {missing[:10]}")
    if missing:
        logger.warning("%d parameters keep their random init (not in init_from): %s", len(missing), missing[:10])
    return _unflatten(flat_params), missing


def _unflatten(flat: dict[tuple, Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


class SkipWatch:
    """Warns (once) when a large share of the records read so far were skipped as bad: a wrong
    image_folder, for one, otherwise trains on the text-only records without a word."""

    def __init__(self, max_fraction: float = 0.1, min_records: int = 100) -> None:
        self.max_fraction, self.min_records = max_fraction, min_records
        self.warned = False

    def check(self, counts: dict[str, int], samples: int) -> None:
        skipped = sum(counts.values())
        read = skipped + samples
        if self.warned or read < self.min_records or skipped <= self.max_fraction * read:
            return
        self.warned = True
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        logger.warning(
            "%d of the %d records read so far (%.0f%%) were skipped (%s); check the data and data.image_folder "
            "(python run.py inspect-data lists the bad records)", skipped, read, 100 * skipped / read, reasons,
        )


class SkipLimit:
    """`data.max_skip_fraction`: whether this process has skipped too large a share of the records
    it read (counted since the run began, so a resumed run keeps its tally), and the error saying so."""

    def __init__(self, max_fraction: float | None, min_records: int) -> None:
        self.max_fraction, self.min_records = max_fraction, min_records

    def exceeded(self, counts: dict[str, int], samples: int, all_read: bool = False) -> bool:
        """`all_read`: the data has run out, so the share is exact however few records there were."""
        skipped = sum(counts.values())
        read = skipped + samples
        enough = all_read or read >= self.min_records
        return self.max_fraction is not None and read > 0 and enough and skipped > self.max_fraction * read

    def error(self, counts: dict[str, int], samples: int, details: dict[str, str]) -> "TrainingError":
        skipped = sum(counts.values())
        read = skipped + samples
        top = sorted(counts.items(), key=lambda kv: -kv[1])[:3]
        reasons = "; ".join(f"{r}: {n} (first: {details.get(r, '?')})" for r, n in top)
        return TrainingError(
            f"{skipped} of the {read} records read so far ({100 * skipped / read:.0f}%) were skipped as bad, more than "
            f"data.max_skip_fraction={self.max_fraction}: {reasons}. Check the data and data.image_folder "
            "(python run.py inspect-data lists the bad records), or raise data.max_skip_fraction"
        )


class _StopFlag:
    """SIGTERM (preemption), SIGHUP (the terminal closed) or Ctrl-C (SIGINT) sets the flag; the loop
    saves a checkpoint after the current step and returns. A second Ctrl-C aborts at once
    (KeyboardInterrupt)."""

    SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None  # the first signal received
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for signum in self.SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: no signal handling
                return

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt("a second Ctrl-C: stopped without saving")
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        again = " (Ctrl-C again to abort without saving)" if signum == signal.SIGINT else ""
        logger.warning("%s received: saving a checkpoint and stopping after this step%s", name, again)
        self.requested = True
        self.signum = signum

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


# ---- the loop ------------------------------------------------------------------------------------
def train(
    config: TrainConfig,
    *,
    stop_at_step: int | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    keep_state: bool = False,
) -> TrainResult:
    """Runs (or resumes) training until `config.num_steps`, SIGTERM / Ctrl-C, or `stop_at_step`.

    `stop_at_step` defaults to `config.stop_at_step`. `on_step(step, metrics)` is called with
    every step's metrics, once the step after it is dispatched (tests, custom monitoring).
    """
    stop_at_step = config.stop_at_step if stop_at_step is None else stop_at_step
    # Checks first, writes after: a refused run leaves output_dir as it was.
    check_inputs(config)
    mesh = make_mesh(config.mesh)
    check_attention_impl(config.model.attention_impl, mesh.devices.flat[0].platform)
    shards, accum = resolve_batch_layout(config, data_parallel_size(mesh))
    # Derived sizes: recipe.json (the resolved config) records the values used.
    if config.global_batch_size == -1:
        config.global_batch_size = shards * config.data.rows_per_host * accum
    config.grad_accum = accum
    from manager_jax.data.pipeline import open_source

    # Read before anything is written: an unreadable or empty data file leaves output_dir as it was.
    check_vocabulary(config)
    source = None if config.synthetic_records else open_source(config.data)
    eval_source = open_eval_source(config)
    num_records = None if source is None else len(source)
    check_resume(config, shards, num_records, log=False)  # before the lock: a refused run leaves output_dir as it was
    lock = _lock_run_dirs(config)
    try:
        # Again under the lock: a run that held it until now may have saved newer checkpoints.
        latest = check_resume(config, shards, num_records)
        return _train(config, mesh, shards, accum, source, eval_source, latest, stop_at_step, on_step, keep_state)
    finally:
        if lock is not None:
            lock.release()


def check_vocabulary(config: TrainConfig) -> None:
    """The tokenizer's ids must have rows in the model's embedding: an id beyond them reads no
    embedding, and the loss is NaN from the first step on."""
    from manager_jax.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(config.data.tokenizer_path)
    if tokenizer.vocab_size > config.model.text.vocab_size:
        raise RecipeError(
            f"the tokenizer ({config.data.tokenizer_path or 'the offline Qwen2 one'}) has {tokenizer.vocab_size} ids "
            f"but model.text.vocab_size is {config.model.text.vocab_size}: its ids from "
            f"{config.model.text.vocab_size} on would have no embedding")


def _lock_run_dirs(config: TrainConfig) -> RunLock | None:
    """Process 0 locks output_dir (and checkpoint.dir when outside it); all processes stop when it
    is in use by another run."""
    lock, refusal = None, None
    if jax.process_index() == 0:
        directories = [config.output_dir]
        checkpoints = os.path.abspath(config.checkpoint_dir())
        if os.path.commonpath([checkpoints, os.path.abspath(config.output_dir)]) != os.path.abspath(config.output_dir):
            directories.append(checkpoints)
        try:
            lock = RunLock(directories)
        except RunDirectoryInUse as err:
            refusal = err
    if any_process((refusal is not None,))[0]:
        raise refusal or RunDirectoryInUse(
            "process 0 found output_dir in use by another training run; its error names the run")
    return lock


def _train(config: TrainConfig, mesh: Any, shards: int, accum: int, source: Any, eval_source: Any, latest: int | None,
           stop_at_step: int | None, on_step: Callable[[int, dict], None] | None, keep_state: bool) -> TrainResult:
    """`train` once the run holds its directories."""
    primary = jax.process_index() == 0
    from manager_jax.data.pipeline import open_source

    loss_cfg = LossConfig(config.loss_normalization, config.loss_token_budget, config.loss_chunk_size)
    setup = make_setup(
        config.model, mesh, tunable_parts=config.tunable_parts, optim=config.optim,
        total_steps=config.num_steps, loss=loss_cfg, plain_causal=not config.data.pack,
    )
    if config.synthetic_records:
        _prepare_synthetic_data(config)
        source = open_source(config.data)
    eval_data = None  # (data config, source) of the held-out set
    if config.eval.synthetic_records:
        eval_data = synthetic_eval_data(config, os.path.join(_synthetic_data_dir(config), "eval"))
    elif eval_source is not None:
        eval_data = (eval_data_config(config), eval_source)
    if primary:
        os.makedirs(config.output_dir, exist_ok=True)
        run_files.write_atomically(os.path.join(config.output_dir, "recipe.json"), config.to_json())
    logger.info(
        "mesh %s; %d shards x %d rows x %d accumulation steps per step; %d params (%d trainable: %s)",
        dict(mesh.shape), shards, config.data.rows_per_host, accum, setup.num_params(),
        setup.num_params(trainable_only=True), ",".join(sorted(setup.tunable_groups)),
    )

    ckpt = Checkpointer(config.checkpoint_dir(), keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    ckpt.write_model_config(config.model)
    data_states = None
    if latest is not None:
        logger.info("resuming from %s step %d", ckpt.directory, latest)
        try:
            state, data_states, _ = ckpt.restore(latest, setup.abstract_state)
        except Exception as err:  # unreadable or damaged array files: Orbax / TensorStore errors of many kinds
            raise restore_failure(f"cannot restore step {latest} from {ckpt.directory}", err) from err
    else:
        params = init_params(setup, config.seed)
        if config.init_from:
            params, _ = load_initial_params(setup, params, config.init_from, config.init_strict)
        state = init_state(setup, params, config.seed)
    first_step = int(jax.device_get(state["step"]))
    if stop_at_step is not None and stop_at_step <= first_step and primary:
        logger.warning("stop_at_step=%d is not after the checkpoint's step %d: it stops nothing (the run goes on "
                       "to num_steps=%d)", stop_at_step, first_step, config.num_steps)
    if first_step >= config.num_steps and primary:
        logger.warning("the checkpoint is at step %d, num_steps is %d: nothing to train (raise num_steps to go on)",
                       first_step, config.num_steps)

    from manager_jax.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(config.data.tokenizer_path)
    feed = DataFeed(config.data, setup, shards=shards, accum=accum, tokenizer=tokenizer, source=source,
                    token_budget=config.loss_token_budget)
    if data_states is not None:
        feed.set_states(data_states)
    fields = batch_field_shapes(
        config.model, rows=config.data.rows_per_host, seq_len=config.data.seq_len,
        max_crops=config.data.max_crops, max_image_tokens=config.data.max_image_tokens, pixel_dtype=feed.pixel_dtype,
    )
    batch_abstract = abstract_step_batch(setup, fields, accum=accum, shards=shards)
    step_fn = jit_train_step(setup, batch_abstract)
    evaluator = None if eval_data is None else Evaluator(
        config, setup, data_config=eval_data[0], source=eval_data[1], shards=shards, accum=accum, tokenizer=tokenizer,
        batch_abstract=batch_abstract)

    writer = MetricsWriter(
        config.output_dir, enabled=primary, tensorboard=config.logging.tensorboard, wandb=config.logging.wandb,
        wandb_project=config.logging.wandb_project, wandb_run_name=config.logging.wandb_run_name,
        config=config.to_dict(), drop_after_step=first_step,
    )
    skip_watch = SkipWatch()
    skip_limit = SkipLimit(config.data.max_skip_fraction, config.data.skip_check_after)

    def too_many_skips(data_done: bool) -> bool:
        return skip_limit.exceeded(*feed.skip_stats(), all_read=data_done)

    def stop_for_skips(data_done: bool) -> None:
        """Every process stops when one has read too many bad records (each judges its own shards)."""
        if too_many_skips(data_done):
            counts, samples = feed.skip_stats()
            raise skip_limit.error(counts, samples, feed.skip_details())
        raise TrainingError(
            f"another process skipped more than data.max_skip_fraction={skip_limit.max_fraction} of its records "
            "as bad; its error names them"
        )
    progress = Progress(config.num_steps, first_step, enabled=primary and config.logging.progress_bar)
    stop = _StopFlag()
    stop.install()
    peak = config.peak_tflops_per_device or flops_lib.peak_tflops(jax.devices()[0].device_kind)
    recipe_dict = config.to_dict()

    def save(step: int, local_states: dict[int, Any]) -> None:
        nonlocal saved_step
        states = gather_shard_states(local_states, shards)
        try:
            ckpt.save(step, state, states, recipe_dict)
        except CheckpointSaveError as err:
            raise TrainingError(str(err)) from err
        saved_step = step
        log_completed_save()  # the one before, found complete before this one started

    def log_completed_save() -> None:
        """The "checkpoint" event of metrics.jsonl, once its background save is complete (not when
        it starts: a save that then fails is no checkpoint)."""
        completed = ckpt.take_completed()
        if completed is not None:
            writer.event(completed, "checkpoint", directory=ckpt.directory)

    losses: list[float] = []
    timed: list[dict] = []  # the records of the steps after this call's first
    status, stop_signal = "completed", None
    nonfinite_streak = 0
    last_finite = first_step if first_step else None
    saved_step = latest
    step = first_step
    full_loss_step = None  # compiled on first use: a batch with more supervised tokens than the budget

    # One step ahead: step n+1 is dispatched before step n's metrics are read, so the host's work
    # between steps (reading metrics, logging, the next dispatch) overlaps step n on the device
    # instead of leaving it idle. A step after which a checkpoint is saved is read before the
    # next dispatch, which takes (donates) its state.
    unread = None  # (step, metrics on the device) of the last dispatched step
    last_read = time.perf_counter()

    def read_unread() -> None:
        """Reads the unread step's metrics (waiting for that step alone) and logs them; counts
        non-finite steps and aborts after max_nonfinite_steps of them in a row."""
        nonlocal unread, last_read, nonfinite_streak, last_finite
        if unread is None:
            return
        (done, metrics), unread = unread, None
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        step_time, last_read = now - last_read, now
        loss = float(metrics["loss"])
        losses.append(loss)
        abort = None  # raised once this step's record is written
        if not bool(metrics["finite"]):
            nonfinite_streak += 1
            grad_norm = float(metrics["grad_norm"])
            writer.event(done, "nonfinite_step_skipped", loss=loss, grad_norm=grad_norm)
            logger.warning("step %d: non-finite loss %s / grad norm %s; update skipped", done, loss, grad_norm)
            if nonfinite_streak >= config.max_nonfinite_steps:
                bad = [name for name, v in (("the loss", loss), ("the gradient norm", grad_norm)) if not math.isfinite(v)]
                which = " and ".join(bad) + (" were" if len(bad) > 1 else " was") if bad else "the update was"
                abort = TrainingError(
                    f"{nonfinite_streak} non-finite steps in a row (max_nonfinite_steps={config.max_nonfinite_steps}), "
                    f"steps {done - nonfinite_streak + 1}..{done}: {which} not finite at step {done} "
                    f"(loss {loss}, grad norm {grad_norm}); last finite step: {last_finite or 'none in this run'}; "
                    + (f"last checkpoint: step {saved_step} in {ckpt.directory}; resuming reruns from it"
                       if saved_step else "no checkpoint saved: a relaunch starts over")
                    + "; lower optim.lr or set optim.max_grad_norm first"
                )
        else:
            nonfinite_streak = 0
            last_finite = done
        record = _step_record(config, setup, metrics, step_time, peak, first=(done == first_step + 1))
        if not record.get("includes_compile"):
            timed.append(record)
        skip_counts, samples_read = feed.skip_stats()  # includes the batch read ahead
        skip_watch.check(skip_counts, samples_read)
        if done % config.logging.every_steps == 0 or done == config.num_steps:
            memory = memory_record(jax.local_devices()[0]) if writer.enabled else {}
            writer.write(done, {**record, **memory, "data_skips": skip_counts})
        if abort is not None:
            raise abort
        progress.update(loss)
        if on_step is not None:
            on_step(done, record)

    def evaluate(done: int) -> None:
        """The held-out evaluation after step `done`, with the state that step produced."""
        nonlocal last_read
        read_unread()
        results = evaluator.run(state["params"])
        writer.evaluation(done, results)
        if primary:
            logger.info("step %d: %s", done, format_evaluation(results))
        last_read = time.perf_counter()  # the next step's time leaves the evaluation out

    cleanups = (progress.close, stop.uninstall, ckpt.close, feed.close, writer.close)
    try:
        # One vote of all processes per step (the first batch has its own), on flags of the host:
        # whether to stop after the step just dispatched, whether a shard ran out of data, and
        # whether the next batch exceeds the loss token budget (every process runs the same program).
        fetched = feed.next() if step < config.num_steps else None
        data_done = fetched is None and step < config.num_steps
        exhausted, over_budget, skips_over = any_process(
            (fetched is None, fetched is not None and fetched[1], too_many_skips(data_done)))
        if skips_over:
            stop_for_skips(data_done)
        if exhausted and step < config.num_steps:
            status, fetched = "data_exhausted", None
            if step == 0:  # not one step's batch in the data: a run that trains nothing has failed
                raise TrainingError(
                    f"the data ran out before the first step: {config.data.mixture or config.data.data_path} does not "
                    f"fill one step's batch ({config.global_batch_size} rows: {shards} shards x "
                    f"{config.data.rows_per_host} rows x {accum} accumulation steps) in data.num_epochs="
                    f"{config.data.num_epochs}; give more data, more epochs (None: repeat) or a smaller batch")
            logger.warning("the data ran out at step %d (num_steps %d): nothing to train", step, config.num_steps)
        while fetched is not None and step < config.num_steps:
            batch = place_batch(setup, fetched[0], shards=shards)
            run = step_fn
            if config.loss_token_budget and over_budget:
                if full_loss_step is None:
                    logger.info("a batch exceeds loss_token_budget=%d; using the step without a budget for such batches",
                                config.loss_token_budget)
                    full_loss_step = jit_train_step(setup, batch_abstract, dataclasses.replace(loss_cfg, token_budget=0))
                run = full_loss_step
            state, metrics = run(state, batch)
            step += 1
            # Data states after this step's batches: captured before reading ahead.
            data_after = feed.get_states()
            fetched = feed.next() if step < config.num_steps else None
            # The data has run out only when a read found none: after the last step nothing is read.
            data_done = fetched is None and step < config.num_steps
            read_unread()  # the step before this one, which ran while this one was dispatched
            unread = (step, metrics)
            # A SIGTERM / Ctrl-C that came while this step ran stops after it.
            # A background save that failed (disk full, ...) stops the run now, not at the next save.
            save_error = ckpt.save_error()
            log_completed_save()
            stop_requested, exhausted, over_budget, skips_over, save_failed = any_process((
                stop.requested or step == stop_at_step,
                data_done,
                fetched is not None and fetched[1],
                too_many_skips(data_done),
                save_error is not None,
            ))
            if save_failed:
                read_unread()
                raise TrainingError(save_error or "saving a checkpoint failed on another process; its error names the cause")
            if skips_over:
                read_unread()  # this step's metrics, with its data_skips, reach metrics.jsonl first
                stop_for_skips(data_done)
            every = config.checkpoint.every_steps
            if stop_requested or exhausted or step == config.num_steps or (every and step % every == 0):
                read_unread()
                save(step, data_after)  # the iterator states before the read-ahead
            # Not after a signal (a preemption must save and go); after stop_at_step, as planned.
            signalled = stop_requested and step != stop_at_step
            eval_every = config.eval.every_steps
            if evaluator is not None and not signalled and (
                    exhausted or step == config.num_steps or (eval_every and step % eval_every == 0)):
                evaluate(step)
            # A signal that came during the last step stops nothing: that step's checkpoint, checked
            # below, is the final one, and a relaunch would have nothing to train.
            if stop_requested and step < config.num_steps:
                status = "stopped"
                if step != stop_at_step:
                    stop_signal = stop.signum or signal.SIGTERM
                break
            if exhausted:
                status = "data_exhausted"
                logger.warning("the data ran out at step %d (num_steps %d)", step, config.num_steps)
                break
        read_unread()
        save_error = ckpt.save_error(wait=True)  # the last save, written in the background
        log_completed_save()
        if any_process((save_error is not None,))[0]:
            raise TrainingError(save_error or "saving a checkpoint failed on another process; its error names the cause")
    except BaseException:
        _close_all(cleanups)  # the error on its way out is the one to report
        raise
    failure = _close_all(cleanups)
    if failure is not None:
        raise failure
    throughput = _throughput(timed)
    if primary and losses:
        logger.info("steps %d..%d: first loss %.4f, last loss %.4f (%s)", first_step + 1, step, losses[0], losses[-1], status)
    if primary and throughput:
        logger.info("steps %d..%d: %s", step - len(timed) + 1, step, format_throughput(throughput))
    return TrainResult(first_step, step, losses, status, ckpt.directory, state if keep_state else None, stop_signal,
                       throughput)


def _throughput(records: list[dict]) -> dict[str, float | None]:
    """Medians of the steps' records (a checkpoint save or a slow batch moves a mean, not these)."""
    if not records:
        return {}
    mfus = [r["mfu"] for r in records if r["mfu"] is not None]
    return {"step_time_s": statistics.median(r["step_time_s"] for r in records),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records),
            "samples_per_s": statistics.median(r["samples_per_s"] for r in records),
            "mfu": statistics.median(mfus) if mfus else None}


def format_throughput(t: dict[str, float | None]) -> str:
    """'median step 0.612 s, 1,234 tokens/s, 3.3 samples/s, MFU 12.3%'."""
    text = (f"median step {t['step_time_s']:.3f} s, {t['tokens_per_s']:,.0f} tokens/s, "
            f"{t['samples_per_s']:.3g} samples/s")
    return text + (f", MFU {100 * t['mfu']:.1f}%" if t["mfu"] is not None else "")


def _close_all(closers: tuple[Callable[[], None], ...]) -> Exception | None:
    """Runs every closer, also after one failed (a full disk fails several: the checkpointer's
    wait, metrics.jsonl's last flush); returns the first failure."""
    first = None
    for close in closers:
        try:
            close()
        except Exception as err:  # noqa: BLE001 - each is reported (first) or logged, none skips the rest
            if first is None:
                first = err
            else:
                logger.debug("closing the run after an earlier failure: %s", err, exc_info=True)
    return first


def _step_record(config: TrainConfig, setup: TrainSetup, m: dict, step_time: float, peak: float | None, first: bool) -> dict:
    n_dev = setup.mesh.devices.size
    model_flops = flops_lib.train_flops(
        config.model, crops=float(m["crops"]), tokens=float(m["real_tokens"]), sum_sq_lengths=float(m["attn_sq"]),
        trainable=setup.tunable_groups,
    )
    record = {
        "loss": float(m["loss"]),
        "token_mean_loss": float(m["token_mean_loss"]),
        "grad_norm": float(m["grad_norm"]),
        "skipped": not bool(m["finite"]),
        "supervised_tokens": int(m["supervised_tokens"]),
        "tokens": int(m["real_tokens"]),
        "samples": int(m["samples"]),
        "step_time_s": step_time,
        "tokens_per_s": float(m["real_tokens"]) / step_time,
        "samples_per_s": float(m["samples"]) / step_time,
        "model_tflops": model_flops / 1e12,
        "mfu": (model_flops / step_time / (n_dev * peak * 1e12)) if peak else None,
        **{k: float(v) for k, v in m.items() if k.startswith("lr/")},
    }
    if first:
        record["includes_compile"] = True
    if not math.isfinite(record["loss"]):
        record["loss"] = str(record["loss"])
    return record
