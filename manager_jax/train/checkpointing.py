"""Training checkpoints: an Orbax CheckpointManager directory (async, atomic, keep last K).

Layout (``<output_dir>/checkpoints``)::

    config.json           the ModelConfig (so params_io / `run.py generate` read the directory)
    <step>/params/        pure parameter dict (PyTree; Manager block indices stored as strings)
    <step>/opt_state/     optimizer state, flattened to {key path: array}
    <step>/train_state/   {"step", "rng"}
    <step>/data/          JSON: the data iterator state of every shard (all processes)
    <step>/recipe/        JSON: the resolved run config

Every array is restored onto the shardings of an abstract target (``jax.ShapeDtypeStruct`` with
``.sharding``), so a checkpoint written on one mesh restores on another (8 devices -> 1).

Stacked layer leaves (leading ``layers`` axis, params and their optimizer moments) are stored one
layer per chunk, so an export reads one layer at a time instead of the whole stack; the chunks
split each device's shard, so every process still writes only its own data.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from manager_jax.params_io import int_keys, quiet_orbax_save_failures
from manager_jax.sharding import logical_axes, path_str
from manager_jax.train import run_files

logger = logging.getLogger(__name__)

ITEMS = ("params", "opt_state", "train_state", "data", "recipe")


def _str_keys(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {str(k): _str_keys(v) for k, v in tree.items()}
    return tree


def flatten_tree(tree: Any) -> dict[str, Any]:
    """{dotted key path: leaf}; optimizer states (named tuples, masked nodes) become a plain dict."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = path_str(path) or "_"
        if key in flat:
            raise ValueError(f"two leaves share the key path {key!r}")
        flat[key] = leaf
    return flat


def unflatten_like(target: Any, flat: Mapping[str, Any]) -> Any:
    """Inverse of flatten_tree with the structure of `target`."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(target)
    leaves = []
    for path, _ in paths:
        key = path_str(path) or "_"
        if key not in flat:
            raise KeyError(f"checkpoint has no entry {key!r}")
        leaves.append(flat[key])
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _save_args(tree: Any) -> Any:
    """Per-leaf SaveArgs: a stacked leaf's chunks are split on the layer axis down to one layer.

    Orbax otherwise writes one chunk per device shard, which spans every layer (the layer axis is
    not sharded). `shard_axes=(0,)` splits the chunk within the shard, so chunks still divide it.
    """

    def one(path, leaf):
        stacked = logical_axes(path_str(path), np.shape(leaf))[:1] == ("layers",)
        return ocp.SaveArgs(shard_axes=(0,) if stacked else ())

    return jax.tree_util.tree_map_with_path(one, tree)


def _restore_args(abstract: Any) -> Any:
    def one(leaf):
        sharding = getattr(leaf, "sharding", None)
        if sharding is None:
            return ocp.RestoreArgs(restore_type=np.ndarray, dtype=leaf.dtype)
        return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=tuple(leaf.shape), dtype=leaf.dtype)

    return jax.tree.map(one, abstract)


class CheckpointSaveError(run_files.WriteFailed):
    """A checkpoint could not be written (disk full, no permission, ...)."""


class Checkpointer:
    """Saves and restores the train state, the data iterator states and the run config."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True) -> None:
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep if keep > 0 else None,
            enable_async_checkpointing=async_save,
            create=True,
            # What a killed save left (a "<step>.orbax-checkpoint-tmp" directory) is removed: the run
            # holds the directory (run_lock), so no other save is in progress there.
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        quiet_orbax_save_failures()  # save_error reports a failed save once
        self.last_save: int | None = None  # step of the last save started
        self._unchecked = False  # whether that save's outcome is still to be read
        self._completed: int | None = None  # a save found complete and not yet taken by take_completed

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def write_model_config(self, model_config: Any) -> None:
        """config.json at the root (process 0), so the directory is a params_io source."""
        if jax.process_index() == 0:
            os.makedirs(self.directory, exist_ok=True)
            run_files.write_atomically(os.path.join(self.directory, "config.json"),
                                       json.dumps(model_config.to_dict(), indent=2))

    def save(self, step: int, state: dict, data_states: list[Any], recipe: dict) -> bool:
        """Starts an (async) save of everything; returns whether a save was started."""
        params, opt_state = _str_keys(state["params"]), flatten_tree(state["opt_state"])
        args = ocp.args.Composite(
            params=ocp.args.PyTreeSave(params, save_args=_save_args(params)),
            opt_state=ocp.args.PyTreeSave(opt_state, save_args=_save_args(opt_state)),
            train_state=ocp.args.PyTreeSave({"step": state["step"], "rng": state["rng"]}),
            data=ocp.args.JsonSave({"shards": data_states}),
            recipe=ocp.args.JsonSave(recipe),
        )
        earlier = self.save_error(wait=True)  # orbax waits for the last save anyway; its error is that step's
        if earlier:
            raise CheckpointSaveError(earlier)
        try:
            started = self.manager.save(int(step), args=args, force=True)
        except Exception as err:  # what the writer raised: OSError, tensorstore's ValueError, ...
            raise CheckpointSaveError(self._failure(err, step)) from err
        self.last_save, self._unchecked = int(step), True
        return started

    def save_error(self, wait: bool = False) -> str | None:
        """Why the last background save failed (said once), or None: while it runs (unless `wait`)
        and once it succeeded. Cheap enough to ask every step."""
        if not self._unchecked or not (wait or not self.manager.is_saving_in_progress()):
            return None
        self._unchecked = False
        try:
            # Orbax keeps a failed save's error for the next wait (check_for_errors misses it).
            self.manager.wait_until_finished()
        except Exception as err:  # as in save
            return self._failure(err, self.last_save)
        self._completed = self.last_save
        return None

    def take_completed(self) -> int | None:
        """The step of a save that `save_error` (or `save`) found complete since the last call, once."""
        step, self._completed = self._completed, None
        return step

    def _failure(self, err: Exception, step: int | None) -> str:
        try:
            earlier = [s for s in self.all_steps() if step is None or s < step]
        except Exception:  # noqa: BLE001 - the listing is extra information; the failure is the message
            earlier = []
        resume = f"the next launch resumes from step {earlier[-1]}" if earlier else "no earlier checkpoint"
        return (f"saving the checkpoint of step {step} in {self.directory} failed: {run_files.cause(err)}; "
                f"the earlier checkpoints there are complete ({resume})")

    def restore(self, step: int, abstract_state: dict) -> tuple[dict, list[Any], dict]:
        """(state on the abstract target's shardings, data states per shard, recipe dict)."""
        abstract_params = _str_keys(abstract_state["params"])
        abstract_opt = flatten_tree(abstract_state["opt_state"])
        abstract_ts = {"step": abstract_state["step"], "rng": abstract_state["rng"]}
        args = ocp.args.Composite(
            params=ocp.args.PyTreeRestore(item=abstract_params, restore_args=_restore_args(abstract_params)),
            opt_state=ocp.args.PyTreeRestore(item=abstract_opt, restore_args=_restore_args(abstract_opt)),
            train_state=ocp.args.PyTreeRestore(item=abstract_ts, restore_args=_restore_args(abstract_ts)),
            data=ocp.args.JsonRestore(),
            recipe=ocp.args.JsonRestore(),
        )
        out = self.manager.restore(int(step), args=args)
        state = {
            "params": int_keys(out["params"]),
            "opt_state": unflatten_like(abstract_state["opt_state"], out["opt_state"]),
            "step": out["train_state"]["step"],
            "rng": out["train_state"]["rng"],
        }
        return state, list(out["data"]["shards"]), dict(out["recipe"])

    def read_recipe(self, step: int | None = None) -> dict:
        """The run config saved with a checkpoint (latest by default)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint")
        out = self.manager.restore(step, args=ocp.args.Composite(recipe=ocp.args.JsonRestore()))
        return dict(out["recipe"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class IncompleteCheckpointError(FileNotFoundError):
    """The latest step directory lacks items (removed or damaged files): a resume cannot restore it."""


def missing_items(step_dir: str) -> list[str]:
    """The items of a finished step directory that are absent or have no Orbax metadata."""
    metadata = {"data": "metadata", "recipe": "metadata"}
    return [item for item in ITEMS
            if not os.path.exists(os.path.join(step_dir, item, metadata.get(item, "_METADATA")))]


def saved_run(directory: str) -> tuple[list[int], dict | None, list[Any] | None]:
    """(steps, run config of the latest step, its data states per shard) of a checkpoint directory;
    ([], None, None) when it holds none. Reads only: creates nothing. IncompleteCheckpointError
    when the latest step lacks an item."""
    if not os.path.isdir(directory):
        return [], None, None
    manager = ocp.CheckpointManager(
        os.path.abspath(directory), options=ocp.CheckpointManagerOptions(create=False),
        item_names=ITEMS,
    )
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            return [], None, None
        missing = missing_items(os.path.join(directory, str(steps[-1])))
        if missing:
            earlier = f"to resume from step {steps[-2]}" if len(steps) > 1 else "to start afresh"
            raise IncompleteCheckpointError(
                f"{os.path.join(directory, str(steps[-1]))}: the checkpoint of step {steps[-1]} has no readable "
                f"{', '.join(missing)} (files removed or damaged); remove that step directory {earlier}")
        out = manager.restore(steps[-1], args=ocp.args.Composite(recipe=ocp.args.JsonRestore(),
                                                                 data=ocp.args.JsonRestore()))
    finally:
        manager.close()
    return steps, dict(out["recipe"]), list(out["data"]["shards"])


def gather_shard_states(local: Mapping[int, Any], num_shards: int) -> list[Any]:
    """The data states of all shards, on every process, from each process's own shards.

    Serialised as JSON bytes and exchanged with one all-gather (every process calls this).
    """
    if jax.process_count() == 1:
        missing = [k for k in range(num_shards) if k not in local]
        if missing:
            raise ValueError(f"no data state for shards {missing}")
        return [local[k] for k in range(num_shards)]
    from jax.experimental import multihost_utils

    payload = json.dumps({str(k): v for k, v in local.items()}).encode()
    length = np.asarray([len(payload)], np.int64)
    lengths = np.asarray(multihost_utils.process_allgather(length)).reshape(-1)
    # A power of two: the all-gather compiles once per buffer length, and the states' JSON changes
    # length at most checkpoints of a run (positions, counters, skip details).
    buf = np.zeros(1 << max(10, (int(lengths.max()) - 1).bit_length()), np.uint8)
    buf[: len(payload)] = np.frombuffer(payload, np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(lengths), -1)
    merged: dict[int, Any] = {}
    for row, n in zip(gathered, lengths):
        merged.update({int(k): v for k, v in json.loads(bytes(row[: int(n)]).decode()).items()})
    missing = [k for k in range(num_shards) if k not in merged]
    if missing:
        raise ValueError(f"no process holds the data state of shards {missing}")
    return [merged[k] for k in range(num_shards)]

