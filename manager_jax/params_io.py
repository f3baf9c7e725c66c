"""Our params directory: Orbax parameters + the model config, written atomically.

Layout of a params directory (what `python -m tools.convert_weights to-orbax` writes and what
`run.py generate/score` and training accept as an initial checkpoint):

    DIR/config.json   ModelConfig.to_dict()
    DIR/params/       an Orbax PyTree checkpoint of the parameter tree (docs/CONTRACTS.md §3),
                      a pure nested dict; Manager block indices are int keys, as in nnx.List
    DIR/...           optional extra files (conversion record, tokenizer/)

A training checkpoint (an Orbax CheckpointManager directory: numbered step directories, each with a
`params` item) is accepted wherever a params directory is: the latest step is used.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import os
import shutil
import signal
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from manager_jax import exit_status
from manager_jax.config import ModelConfig

PARAMS_ITEM = "params"
CONFIG_FILE = "config.json"


class ParamsError(ValueError):
    """A params directory or tree that does not match what is expected."""


# ---- Orbax plumbing -----------------------------------------------------------------------------


STREAM_BYTES_IN_FLIGHT = 512 * 2**20  # streamed pieces read but not yet written


@dataclass(frozen=True)
class StreamedArray:
    """A tree leaf whose data is produced only while it is written, one piece at a time.

    `read(i)` returns row i of the leading axis (a layer of a stacked parameter) when `layered`,
    else `read(None)` the whole array; either may have any float dtype (cast on write). Saving a
    tree of these holds one piece in memory at a time instead of the whole model.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[int | None], np.ndarray]
    layered: bool = False

    @property
    def size(self) -> int:  # Orbax refuses zero-size values by their .size
        return int(np.prod(self.shape, dtype=np.int64))


class _NumpyHandler(ocp.type_handlers.NumpyHandler):
    """Numpy arrays as Orbax writes them, plus StreamedArray leaves written piece by piece.

    Stored exactly like numpy arrays (same typestr, same reader); a layered leaf is chunked one
    layer per chunk, so each layer's write is a whole chunk and is flushed before the next is read.
    """

    async def _background_serialize(self, values, infos, args=None):
        args = args or [ocp.type_handlers.SaveArgs()] * len(values)
        plain = [i for i, v in enumerate(values) if not isinstance(v, StreamedArray)]
        if plain:
            await super()._background_serialize([values[i] for i in plain], [infos[i] for i in plain],
                                                 [args[i] for i in plain])
        # Pieces are read while earlier ones are still being written, up to a byte budget: memory
        # stays bounded, and reading overlaps writing.
        in_flight: collections.deque = collections.deque()
        in_flight_bytes = 0
        for value, info, arg in zip(values, infos, args):
            if not isinstance(value, StreamedArray):
                continue
            store = await self._open_streamed(value, info, arg)
            for i in range(value.shape[0]) if value.layered else [None]:
                data = np.asarray(value.read(i)).astype(value.dtype, copy=False)
                # The piece stays referenced until its write commits: what is in flight is what is held.
                in_flight.append(((store[i] if i is not None else store).write(data), data))
                in_flight_bytes += data.nbytes
                while in_flight_bytes > STREAM_BYTES_IN_FLIGHT:
                    write, piece = in_flight.popleft()
                    await write  # its commit: the piece's memory is free after this
                    in_flight_bytes -= piece.nbytes
                    del piece
                del data
        while in_flight:
            await in_flight.popleft()[0]

    async def _open_streamed(self, value: StreamedArray, info, arg):
        import tensorstore as ts

        await info.await_path_creation()
        shape = tuple(value.shape)
        piece = (1, *shape[1:]) if value.layered else shape
        spec = ocp.type_handlers.get_json_tspec_write(
            info, use_ocdbt=info.is_ocdbt_checkpoint, global_shape=shape, local_shape=piece, dtype=value.dtype,
            process_index=jax.process_index(), arg=arg)
        return await ts.open(ts.Spec(spec), create=True, open=True, context=info.ts_context)


def _handler(compress: bool = False) -> ocp.PyTreeCheckpointHandler:
    """A PyTree handler whose numpy handler does not deep-copy arrays before writing.

    The default copies every host array first, doubling peak memory for a whole model; our callers
    never mutate the tree while it is saved (the save is synchronous). Compression is off by
    default: with OCDBT, zstd keeps every compressed chunk in memory until the commit (+75% peak
    memory at 0.5B) and triples the save time, for ~25% less disk on bf16 weights. Readers handle
    both.
    """
    numpy_handler = _NumpyHandler(deepcopy_host_arrays=False)
    registry = ocp.type_handlers.create_type_handler_registry(
        (jax.Array, ocp.type_handlers.ArrayHandler()),
        (StreamedArray, numpy_handler),
        (np.ndarray, numpy_handler),
    )
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=compress)


class _DropOrbaxSaveFailureLogs(logging.Filter):
    """For the `absl` logger: Orbax logs a failed save's exception, with its traceback, from each
    writer thread, commit thread and finalize wait that sees it, then raises that same exception
    from `save` / `wait_until_finished`. The caller reports it once, so the log would only repeat
    it (pages of Orbax / asyncio frames before the one-line error of a full disk)."""

    MESSAGES = ("_SignalingThread.run() raised an exception", "Commit operations or the Commit callback in background",
                "Save Finalize thread")

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not any(m in message for m in self.MESSAGES)


def _late_write_callback(unraisable: Any) -> bool:
    """A tensorstore write that finished after its save had failed and Orbax had closed the event
    loop waiting for it: its callback cannot reach the loop, and nothing waits for it any more."""
    tb = unraisable.exc_traceback
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"
            and "call_soon_threadsafe" in frames)


@functools.cache
def quiet_orbax_save_failures() -> None:
    """Once per process: a failed Orbax save reaches its caller as one exception, not as that
    exception logged by every thread that saw it. Kept for the whole process, since the other
    threads of a failed save go on writing, and failing, after the caller got the error."""
    logging.getLogger("absl").addFilter(_DropOrbaxSaveFailureLogs())
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not _late_write_callback(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook


def save_tree(path: str, tree: Mapping, *, compress: bool = False) -> None:
    """Writes a pure nested dict of numpy / jax arrays as an Orbax PyTree checkpoint at `path`."""
    quiet_orbax_save_failures()
    with ocp.Checkpointer(_handler(compress)) as ckpt:
        ckpt.save(os.path.abspath(path), args=ocp.args.PyTreeSave(dict(tree)))


def int_keys(tree: Any) -> Any:
    """Orbax stores dict keys as strings; nnx.List indices are ints. Digit-only keys become ints."""
    if isinstance(tree, Mapping):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): int_keys(v) for k, v in tree.items()}
    return tree


def _strip_value_leaves(tree: Any) -> Any:
    """A tree saved from an nnx.State without `to_pure_dict` has {"value": array} leaves; unwrap them."""
    if isinstance(tree, Mapping):
        if set(tree.keys()) == {"value"} and not isinstance(tree["value"], Mapping):
            return tree["value"]
        return {k: _strip_value_leaves(v) for k, v in tree.items()}
    return tree


def _metadata_tree(path: str) -> Any:
    """The stored tree's metadata; ParamsError when the checkpoint has none (damaged or unfinished)."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise ParamsError(f"{path}: not a directory")
    missing = _missing_files(path)
    if missing:  # said here: Orbax's own failure on these prints tracebacks from its threads first
        raise ParamsError(f"{path}: holds no readable Orbax checkpoint (missing {', '.join(missing)}); "
                          "the save was interrupted or the files were damaged")
    try:
        # The handler's own metadata: a Checkpointer's also looks for a step's _CHECKPOINT_METADATA,
        # which a training checkpoint's params item does not hold (a warning per call).
        meta = _handler().metadata(epath.Path(path))
    except Exception as e:  # Orbax raises many kinds of errors for damaged checkpoints
        raise restore_failure(f"{path}: cannot read the Orbax metadata", e, path) from e
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree) if tree is not None else None
    if not tree:
        raise ParamsError(f"{path}: holds no readable Orbax checkpoint; the save was interrupted or the files "
                          "were damaged")
    return tree


def _missing_files(path: str) -> list[str]:
    """Files an Orbax PyTree checkpoint at `path` lacks: its `_METADATA`, and for the OCDBT layout
    (every checkpoint this project writes, one process or several) its manifest and data directory."""
    names = set(os.listdir(path))
    missing = [] if "_METADATA" in names else ["_METADATA"]
    if "manifest.ocdbt" in names or any(n.startswith("ocdbt.process_") for n in names):
        missing += [n for n in ("manifest.ocdbt", "d") if n not in names]
    elif "_METADATA" in names and not names - _METADATA_ONLY:  # a save cut short before any array
        missing += ["manifest.ocdbt", "d"]
    return missing


def tree_metadata(path: str) -> dict:
    """{shape, dtype} of every array of an Orbax PyTree checkpoint, as `jax.ShapeDtypeStruct`s."""
    tree = _metadata_tree(path)
    tree = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)),
        tree,
        is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"),
    )
    return _strip_value_leaves(int_keys(tree))


def _has_value_wrappers(path: str) -> bool:
    tree = _metadata_tree(path)
    found = []

    def visit(node):
        if isinstance(node, Mapping):
            if set(node.keys()) == {"value"} and not isinstance(node["value"], Mapping):
                found.append(True)
            for v in node.values():
                visit(v)

    visit(tree)
    return bool(found)


def _wrap(tree: Any, wrap: bool) -> Any:
    if not wrap:
        return tree
    if isinstance(tree, Mapping):
        return {k: _wrap(v, wrap) for k, v in tree.items()}
    return {"value": tree}


def restore_tree(path: str, target: Mapping | None = None, *, partial: bool = False) -> dict:
    """Restores an Orbax PyTree checkpoint.

    target None: every array as numpy. Otherwise a nested dict whose leaves are
    `jax.ShapeDtypeStruct` (with `.sharding` to restore as sharded jax.Arrays on any mesh, without it
    as numpy) or arrays; dtypes are cast to the target's. `partial=True` restores only the
    leaves present in `target` (one parameter at a time for streaming).
    """
    path = os.path.abspath(path)
    wrapped = _has_value_wrappers(path)
    if target is None:
        meta = tree_metadata(path)
        target = jax.tree_util.tree_map(lambda s: s, meta)

    def restore_arg(leaf):
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None:
            return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=tuple(leaf.shape), dtype=leaf.dtype)
        return ocp.RestoreArgs(restore_type=np.ndarray, dtype=np.dtype(leaf.dtype))

    item = _wrap(_string_keys(target), wrapped)
    restore_args = jax.tree_util.tree_map(restore_arg, item)
    with ocp.Checkpointer(_handler()) as ckpt:
        out = ckpt.restore(
            path,
            args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=partial),
        )
    return _strip_value_leaves(int_keys(out))


@functools.lru_cache(maxsize=8)
def _value_wrapped(path: str, metadata_mtime_ns: int) -> bool:
    # Read once per checkpoint (the mtime tells a rewritten one): an export opens every parameter.
    return _has_value_wrappers(path)


def open_stored_array(path: str, leaf: Sequence, context: Any = None):
    """One array of an Orbax PyTree checkpoint at `path` as an open TensorStore: any slice of it
    (`store[i].read().result()`) is read alone, e.g. one layer of a stacked parameter.

    `leaf` is the key path in the tree; `context` a TensorStore context to share between calls
    (`ocp.type_handlers.get_ts_context`; its caches are per context)."""
    import tensorstore as ts

    path = os.path.abspath(path)
    with open(os.path.join(path, "_METADATA")) as f:
        meta = json.load(f)
    use_ocdbt = bool(meta.get("use_ocdbt", True))
    wrapped = _value_wrapped(path, os.stat(os.path.join(path, "_METADATA")).st_mtime_ns)
    name = ".".join(str(k) for k in leaf) + (".value" if wrapped else "")
    if context is None:
        context = ocp.type_handlers.get_ts_context(use_ocdbt=use_ocdbt)
    info = ocp.type_handlers.ParamInfo(name=name, parent_dir=epath.Path(path), is_ocdbt_checkpoint=use_ocdbt,
                                       use_zarr3=bool(meta.get("use_zarr3", False)), ts_context=context)
    spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=use_ocdbt)
    return ts.open(ts.Spec(spec), open=True, context=context).result()


def _string_keys(tree: Any) -> Any:
    # Orbax matches the target against the stored tree by string keys.
    if isinstance(tree, Mapping):
        return {str(k): _string_keys(v) for k, v in tree.items()}
    return tree


# ---- params directories ---------------------------------------------------------------------------


# Where `run.py train` keeps its checkpoints inside `output_dir` (manager_jax/train/loop.py).
TRAINING_CHECKPOINTS = "checkpoints"


COMMIT_MARKER = "commit_success.txt"  # Orbax writes it once a step (or an item) is complete
ORBAX_TMP_MARK = ".orbax-checkpoint-tmp"  # in the name of a step Orbax is still writing
# What a params dir holds before its first array is written.
_METADATA_ONLY = {"_METADATA", "_CHECKPOINT_METADATA", "_sharding", "array_metadatas", COMMIT_MARKER}
_LOGGED: set[str] = set()


def _committed(step_dir: str) -> bool:
    return any(os.path.exists(os.path.join(d, COMMIT_MARKER)) for d in (step_dir, os.path.join(step_dir, PARAMS_ITEM)))


def resolve_params_dir(path: str) -> tuple[str, str | None]:
    """(Orbax params item directory, config.json path or None) for a params dir or training checkpoint.

    A training checkpoint directory holds numbered step directories; the latest committed one
    (Orbax's commit_success.txt) with a `params` item wins. Newer steps that are skipped (no params
    item, an unfinished save) are logged; the training loop refuses to resume from a step without
    its items. Its config is
    looked up in the step directory, then the checkpoint root. A training `output_dir` (holding
    `checkpoints/`) resolves to its latest checkpoint.
    """
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise ParamsError(f"{path}: not a directory")
    if os.path.isdir(os.path.join(path, PARAMS_ITEM)):
        cfg = os.path.join(path, CONFIG_FILE)
        if not os.path.exists(cfg) and os.path.basename(path).isdigit():
            cfg = os.path.join(os.path.dirname(path), CONFIG_FILE)  # one step of a training run: the root's
        return os.path.join(path, PARAMS_ITEM), cfg if os.path.exists(cfg) else None
    numbered = sorted((int(name), name) for name in os.listdir(path)
                      if name.isdigit() and os.path.isdir(os.path.join(path, name)))
    steps = [(n, name) for n, name in numbered if os.path.isdir(os.path.join(path, name, PARAMS_ITEM))]
    if not steps and os.path.isdir(os.path.join(path, TRAINING_CHECKPOINTS)):
        return resolve_params_dir(os.path.join(path, TRAINING_CHECKPOINTS))  # a training output_dir
    if not steps:
        hint = ""
        unfinished = [name for _, name in numbered] + [name for name in os.listdir(path) if ORBAX_TMP_MARK in name]
        if unfinished:
            hint = (f" — it holds no complete checkpoint yet ({', '.join(sorted(unfinished)[:3])}: a first save in "
                    "progress or interrupted)")
        elif os.path.exists(os.path.join(path, CONFIG_FILE)) and any(
                name.endswith((".safetensors", ".safetensors.index.json", ".bin")) for name in os.listdir(path)):
            hint = (" — it looks like a PyTorch checkpoint: convert it first with "
                    "`python -m tools.convert_weights to-orbax SRC DST`")
        raise ParamsError(
            f"{path}: neither a params directory ({PARAMS_ITEM}/ + {CONFIG_FILE}) nor a training checkpoint "
            f"(numbered step directories holding a '{PARAMS_ITEM}' item){hint}"
        )
    committed = [s for s in steps if _committed(os.path.join(path, s[1]))]
    # Checkpoints without any commit marker (other Orbax versions, copies) keep the latest step.
    chosen = (committed or steps)[-1]
    skipped = []
    for n, name in numbered:
        if n <= chosen[0]:
            continue
        if (n, name) not in steps:
            skipped.append(f"step {n} has no '{PARAMS_ITEM}' item")
        else:
            skipped.append(f"step {n} is not committed (no {COMMIT_MARKER}: an interrupted or unfinished save)")
    message = f"{path}: using step {chosen[0]}, the newest complete one; " + "; ".join(skipped)
    if skipped and message not in _LOGGED:  # once per process, not at every lookup
        _LOGGED.add(message)
        logging.getLogger(__name__).warning(message)
    step_dir = os.path.join(path, chosen[1])
    for candidate in (os.path.join(step_dir, CONFIG_FILE), os.path.join(path, CONFIG_FILE)):
        if os.path.exists(candidate):
            return os.path.join(step_dir, PARAMS_ITEM), candidate
    return os.path.join(step_dir, PARAMS_ITEM), None


def read_config(cfg_path: str) -> ModelConfig:
    """ModelConfig.from_json_file, with a ParamsError naming the file when it cannot be read."""
    try:
        return ModelConfig.from_json_file(cfg_path)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:  # JSONDecodeError, ConfigError, ...
        what = "not valid JSON" if isinstance(e, json.JSONDecodeError) else "not a usable model config"
        raise ParamsError(f"{cfg_path}: {what} ({type(e).__name__}: {e})") from e


def is_params_dir(path: str) -> bool:
    try:
        resolve_params_dir(path)
        return True
    except ParamsError:
        return False


def load_config(path: str) -> ModelConfig:
    """The ModelConfig of a params directory or training checkpoint."""
    _, cfg_path = resolve_params_dir(path)
    if cfg_path is None:
        raise ParamsError(f"{path}: no {CONFIG_FILE} next to the params (looked in the step dir and the root)")
    return read_config(cfg_path)


def overlap_problem(destination: str, sources: Sequence[str]) -> str | None:
    """Why replacing `destination` would destroy one of `sources` (it is one, holds one or lies in one),
    or None. Paths are compared after resolving symlinks."""
    dst = os.path.realpath(destination.rstrip("/") or "/")
    for source in sources:
        if not source:
            continue
        src = os.path.realpath(source.rstrip("/") or "/")
        if dst == src:
            return f"the destination {destination} is the source {source}"
        if os.path.commonpath([dst, src]) == dst:
            return f"the destination {destination} contains the source {source}"
        if os.path.commonpath([dst, src]) == src:
            return f"the destination {destination} lies inside the source {source}"
    return None


class DestinationExists(ParamsError):
    """The directory to write exists and replacing it was not asked for (callers name their own
    way to ask: a flag, an argument)."""


def resolve_destination(directory: str) -> str:
    """The absolute path `write_atomically` writes: a symlink is followed (its target is replaced and
    the link kept, as cp and rsync write through a link), any other path is taken as given."""
    directory = os.path.abspath(directory.rstrip("/") or "/")
    return os.path.realpath(directory) if os.path.islink(directory) else directory


def destination_problem(directory: str) -> str | None:
    """Why `directory` (after `resolve_destination`) could not be created, checked before any work:
    an ancestor that is not a directory, or a nearest existing ancestor this process cannot write
    (os.access: also a read-only mount; root passes permission bits). None when it can."""
    target = resolve_destination(directory)
    ancestor = os.path.dirname(target)
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        return f"cannot create {directory}: {ancestor} is not a directory"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"cannot create {directory}: {ancestor} is not writable (permissions or a read-only file system)"
    return None


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


# SIGINT raises KeyboardInterrupt, which the cleanup below catches; ExitOnSignal makes the others exit through it too.
_STOP_SIGNALS = (signal.SIGINT, *exit_status.EXIT_SIGNALS)


def write_atomically(
    directory: str, fill: Callable[[str], None], overwrite: bool, *, sources: Sequence[str] = ()
) -> str:
    """Runs fill(tmp_dir) and renames tmp_dir to `directory` only if it succeeds.

    With `overwrite`, an existing `directory` (directory or file) is replaced, unless it is one of
    `sources`, holds one or lies inside one (the paths `fill` reads from): that raises ParamsError
    (DestinationExists without `overwrite`) before anything is written, as does a `directory` that
    cannot be created (`destination_problem`). A symlink `directory` is written through: its
    target is replaced, the link kept. An exception or a SIGTERM / SIGHUP / SIGINT while writing
    removes the temporary directory (SIGTERM / SIGHUP then exit with status 128 + the signal number,
    SIGINT raises KeyboardInterrupt as usual). Returns the path written (a link's target).
    """
    problem = destination_problem(directory)
    if problem:
        raise ParamsError(problem)
    directory = resolve_destination(directory)
    if os.path.lexists(directory):
        if not overwrite:
            raise DestinationExists(f"{directory} already exists")
        problem = overlap_problem(directory, sources)
        if problem:
            raise ParamsError(f"refusing to overwrite: {problem}")
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(directory)}.tmp-{uuid.uuid4().hex[:8]}")
    with exit_status.ExitOnSignal():
        try:
            os.makedirs(tmp)
            fill(tmp)
            # No signal may land between the two renames (that would leave neither version in place).
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
            try:
                trash = None
                if os.path.lexists(directory):
                    trash = os.path.join(parent, f".{os.path.basename(directory)}.old-{uuid.uuid4().hex[:8]}")
                    os.rename(directory, trash)
                os.rename(tmp, directory)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            if trash is not None:
                _remove(trash)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return directory


def check_tree(params: Mapping, expected: Mapping) -> list[str]:
    """Problems (missing / unexpected leaves, shape mismatches) of `params` against `expected`."""
    flat_exp = flatten_tree(expected)
    flat_got = flatten_tree(params)
    problems = []
    for p in sorted(flat_exp.keys() - flat_got.keys(), key=str):
        problems.append(f"missing parameter {dotted(p)} {list(flat_exp[p].shape)}")
    for p in sorted(flat_got.keys() - flat_exp.keys(), key=str):
        problems.append(f"unexpected parameter {dotted(p)} {list(np.shape(flat_got[p]))}")
    for p in sorted(flat_exp.keys() & flat_got.keys(), key=str):
        if tuple(np.shape(flat_got[p])) != tuple(flat_exp[p].shape):
            problems.append(
                f"parameter {dotted(p)} has shape {list(np.shape(flat_got[p]))}, expected {list(flat_exp[p].shape)}"
            )
    return problems


def abstract_params(config: ModelConfig) -> dict:
    """The model's parameters as a pure dict of `jax.ShapeDtypeStruct` (no memory allocated)."""
    from flax import nnx

    from manager_jax.models.llava_ov import LlavaOV

    model = nnx.eval_shape(lambda: LlavaOV(config, rngs=nnx.Rngs(0)))
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(nnx.state(model, nnx.Param))
    )


def save_params(
    directory: str,
    params: Mapping,
    config: ModelConfig,
    *,
    extra_files: Mapping[str, str | bytes] | None = None,
    overwrite: bool = False,
    validate: bool = True,
    compress: bool = False,
    sources: Sequence[str] = (),
) -> str:
    """Writes a params directory atomically (temporary directory + rename); returns its path.

    `params` is a pure nested dict of numpy or jax arrays (e.g. `nnx.state(model, nnx.Param)
    .to_pure_dict()`). With `validate`, the tree must match the model of `config` exactly.
    `extra_files` maps relative names to source file paths (copied) or bytes (written).
    `compress`: zstd chunks (smaller on disk, slower, more memory while saving).
    `sources`: paths the params were read from; `overwrite` refuses to replace any of them (see
    `write_atomically`).
    """
    if validate:
        problems = check_tree(params, abstract_params(config))
        if problems:
            raise ParamsError("params do not match the config:\n  - " + "\n  - ".join(problems))

    def fill(tmp: str) -> None:
        save_tree(os.path.join(tmp, PARAMS_ITEM), params, compress=compress)
        # Read back what Orbax recorded before the directory becomes visible.
        written = tree_metadata(os.path.join(tmp, PARAMS_ITEM))
        problems = check_tree(written, params)
        given = flatten_tree(params)
        problems += [
            f"parameter {dotted(p)} was written as {leaf.dtype}, given {np.dtype(given[p].dtype)}"
            for p, leaf in flatten_tree(written).items()
            if p in given and np.dtype(leaf.dtype) != np.dtype(given[p].dtype)
        ]
        if problems:
            raise ParamsError("the written checkpoint does not read back as given:\n  - " + "\n  - ".join(problems))
        config.save(os.path.join(tmp, CONFIG_FILE))
        for name, content in (extra_files or {}).items():
            dst = os.path.join(tmp, name)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if isinstance(content, bytes):
                with open(dst, "wb") as f:
                    f.write(content)
            else:
                shutil.copyfile(content, dst)

    return write_atomically(directory, fill, overwrite, sources=sources)


def load_params(
    directory: str, *, target: Mapping | None = None, dtype: Any = None
) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params tree) from a params directory or the latest step of a training checkpoint.

    target: None restores numpy arrays. A nested dict of `jax.ShapeDtypeStruct` with shardings (e.g.
    from `nnx.eval_shape` + the sharding rules) restores sharded jax.Arrays onto any mesh.
    dtype: cast every array (e.g. "float32" master weights from a bf16 checkpoint).
    """
    item, cfg_path = resolve_params_dir(directory)
    if cfg_path is None:
        raise ParamsError(f"{directory}: no {CONFIG_FILE} next to the params")
    config = read_config(cfg_path)
    stored = tree_metadata(item)
    if target is None:
        target = stored
    problems = check_tree(stored, target)
    if problems:
        raise ParamsError(f"{directory}: stored params do not match the requested tree:\n  - " + "\n  - ".join(problems))
    if dtype is not None:
        target = jax.tree_util.tree_map(
            lambda s: jax.ShapeDtypeStruct(s.shape, np.dtype(dtype), sharding=getattr(s, "sharding", None)), target
        )
    try:
        return config, restore_tree(item, target)
    except ParamsError:
        raise
    except Exception as e:  # missing or truncated array files: Orbax / TensorStore errors of many kinds
        raise restore_failure(f"{item}: cannot restore the parameters", e, item) from e


# The most of the root cause's line an error shows (TensorStore's can hold a spec of kilobytes).
RESTORE_CAUSE_CHARS = 300


def restore_failure(what: str, err: Exception, path: str | None = None) -> ParamsError:
    """A one-line error for a failed Orbax restore of `path`: the root cause's first line, cut short
    (Orbax wraps TensorStore's reason in an exception whose own text is a multi-line spec dump)."""
    root = err
    while root.__cause__ is not None:
        root = root.__cause__
    line = (str(root).strip().splitlines() or [""])[0]
    if len(line) > RESTORE_CAUSE_CHARS:
        line = line[:RESTORE_CAUSE_CHARS] + " ..."
    if isinstance(root, jax.errors.JaxRuntimeError):
        hint = ""  # a collective whose peer process has gone: nothing about the files
    elif path is not None and not os.path.exists(path):
        hint = ("; it was removed while being read (a training run replacing its older steps?): run again to "
                "read the newest")
    else:
        hint = "; the checkpoint is damaged or unreadable here"
    return ParamsError(f"{what} ({type(root).__name__}: {line}){hint}")


def restore_into(model, params: Mapping) -> None:
    """Copies a pure params dict into an nnx model in place, after checking the structure and shapes."""
    from flax import nnx

    state = nnx.state(model, nnx.Param)
    current = nnx.to_pure_dict(state)
    expected = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), current)
    problems = check_tree(params, expected)
    if problems:
        raise ParamsError("params do not fit the model:\n  - " + "\n  - ".join(problems))

    def place(new, old):
        # Keep the model's dtype and, when it is sharded, its placement.
        new = jax.numpy.asarray(new, dtype=old.dtype)
        sharding = getattr(old, "sharding", None)
        return jax.device_put(new, sharding) if sharding is not None else new

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map(place, _plain(params), current))
    nnx.update(model, state)


# ---- small helpers ------------------------------------------------------------------------------


def flatten_tree(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
    """Nested dict -> {path tuple: leaf}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten_tree(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _plain(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


def dotted(path: tuple) -> str:
    """A key path of flatten_tree as a dotted name, for messages: ('text', 'embed') -> 'text.embed'."""
    return ".".join(str(p) for p in path)


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)
