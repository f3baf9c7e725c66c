"""Run configuration: dataclasses, loading a recipe file and applying ``--set key=value`` overrides.

A recipe file is a Python file with ``get_config(...) -> TrainConfig`` (see ``configs/``):

    python run.py train --config configs/demo.py --set optim.lr=3e-4 --set output_dir=/tmp/run
    python run.py train --config configs/llava_ov.py:stage2_grid_manager_0.5b
    python run.py train --config configs/llava_ov.py --set recipe=stage2_grid_manager_0.5b

``path:arg`` passes ``arg`` as the first argument of ``get_config``; an override whose key is a
parameter of ``get_config`` (``recipe=...``) is passed to it as a keyword; every other override sets
a (nested) field of the returned config. Values are parsed as Python literals (``3e-4``, ``True``,
``None``, ``[1, 2]``); anything else is a string.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import inspect
import json
import math
import os
import re
import types
import typing
from collections.abc import Sequence
from typing import Any

from manager_jax.config import ModelConfig, tiny
from manager_jax.params_io import TRAINING_CHECKPOINTS
from manager_jax.sharding import MeshConfig
from manager_jax.train.optimizer import OptimConfig


class RecipeError(ValueError):
    """A recipe file or override that cannot be applied."""


def _data_config_cls():
    try:
        from manager_jax.data.pipeline import DataConfig
    except ImportError as err:  # the data pipeline is a separate part of the package
        raise RecipeError(f"manager_jax.data.pipeline is unavailable ({err}); cannot build a data config") from err
    return DataConfig


def _default_data():
    return _data_config_cls()()


@dataclasses.dataclass
class CheckpointConfig:
    """Orbax checkpoints under ``<output_dir>/checkpoints`` (or ``dir``)."""

    dir: str | None = None
    every_steps: int = 100  # 0 = only at the end (and on SIGTERM / Ctrl-C)
    keep: int = 3  # last K checkpoints kept
    async_save: bool = True
    # Continue from the latest checkpoint in `dir` when there is one. Its saved run config must
    # describe the same run (model, tunable_parts, data source, batch_shards, record order); other changes (lr,
    # num_steps, seed, ...) are accepted and logged. False with checkpoints present is an error.
    resume: bool = True


@dataclasses.dataclass
class LoggingConfig:
    every_steps: int = 1  # metrics.jsonl / TensorBoard / wandb cadence (>= 1; the last step is always logged)
    progress_bar: bool = True
    tensorboard: bool = True
    wandb: bool = False  # only when the wandb package is installed
    wandb_project: str = "manager_jax"
    wandb_run_name: str | None = None


@dataclasses.dataclass
class EvalConfig:
    """A held-out loss during training: the mean cross-entropy over every supervised token of a
    data set (not in the original, whose scripts train without evaluation).

    On when ``data_path``, ``mixture`` or ``synthetic_records`` is set. The set is read in its file
    order, once per evaluation, into batches of the training's shapes and layout (``data``'s
    rows, seq_len, crops, template, tokenizer; batch_shards x grad_accum shard batches a step), with
    the model as at inference (no Manager jitter). Its records that cannot be used are skipped and
    counted in the evaluation's record, never stopping the run.
    """

    data_path: str | None = None
    image_folder: str | None = None  # None = data.image_folder
    mixture: str | None = None
    format: str = "auto"
    split: str | None = None  # of an ArrayRecord folder; None = data.split
    every_steps: int = 0  # also every this many steps (0 = at the end of the run only)
    max_batches: int = 0  # step batches per evaluation (0 = the whole set)
    # Generate a held-out set of this many records into <output_dir>/data/eval (the demo), drawn
    # with another seed than the training set's.
    synthetic_records: int | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.data_path or self.mixture or self.synthetic_records)


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run needs; saved (resolved) next to every checkpoint.

    Batch layout: each optimizer step consumes ``grad_accum`` micro-steps of ``batch_shards``
    independent shard batches, each ``data.rows_per_host`` rows of ``data.seq_len`` tokens. Shard k
    reads host-share k of ``batch_shards`` from the data pipeline, so the data order does not
    depend on the number of processes or devices. ``batch_shards=-1`` = the data-parallel device
    count (data x fsdp). The three sizes must agree: ``global_batch_size == batch_shards x
    data.rows_per_host x grad_accum``. Give one of the last two as -1 to derive it:
    ``grad_accum=-1`` = ``global_batch_size`` / (shards x rows); ``global_batch_size=-1`` = shards x
    rows x ``grad_accum`` (recipe.json records the value used). An explicit ``grad_accum`` that
    disagrees with ``global_batch_size`` is an error, never silently preferred.
    """

    name: str = "custom"
    output_dir: str = "runs/custom"
    model: ModelConfig = dataclasses.field(default_factory=lambda: tiny("grid_manager"))
    data: Any = dataclasses.field(default_factory=_default_data)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    # The original's --mm_tunable_parts (comma separated; SPEC §2.8).
    tunable_parts: str = "mm_mlp_adapter"
    num_steps: int = 100
    global_batch_size: int = 512  # rows per optimizer step (= samples without packing); -1 = derived
    batch_shards: int = -1
    grad_accum: int = -1  # -1 = derived from global_batch_size; explicit: must agree with it (see above)
    seed: int = 0
    # Initial parameters: params directories (params_io) / training checkpoints, comma separated;
    # later ones override earlier ones (e.g. "llm_and_tower,stage1_projector").
    init_from: str | None = None
    init_strict: bool = False  # every parameter must come from init_from
    loss_normalization: str = "shard_mean"  # shard_mean (original) | token_mean
    loss_token_budget: int = 0  # supervised positions per shard batch through the LM head (0 = all)
    loss_chunk_size: int = 0
    max_nonfinite_steps: int = 5  # abort after this many non-finite steps in a row
    stop_at_step: int | None = None  # save and stop once this step is done (like SIGTERM); resume later
    peak_tflops_per_device: float | None = None  # MFU denominator; None = by device kind
    # Generate a synthetic data set into <output_dir>/data at start (the demo); None = use `data`.
    synthetic_records: int | None = None
    synthetic_image_sizes: Any = None  # (W, H) pairs for the synthetic images; None = defaults

    # ---- derived values ----------------------------------------------------------------------
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.output_dir, TRAINING_CHECKPOINTS)

    def to_dict(self) -> dict:
        return _to_jsonable(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Inverse of to_dict (used to read the config saved with a checkpoint)."""
        d = dict(d)
        kw: dict[str, Any] = {}
        kw["model"] = ModelConfig.from_dict(d.pop("model"))
        kw["data"] = _build(_data_config_cls(), d.pop("data"))
        kw["optim"] = _build(OptimConfig, d.pop("optim"))
        kw["mesh"] = _build(MeshConfig, d.pop("mesh"))
        kw["checkpoint"] = _build(CheckpointConfig, d.pop("checkpoint"))
        kw["logging"] = _build(LoggingConfig, d.pop("logging"))
        kw["eval"] = _build(EvalConfig, d.pop("eval", {}))  # runs saved before evaluation existed have none
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise RecipeError(f"unknown TrainConfig fields {sorted(unknown)}")
        return cls(**kw, **d)


def _build(cls, d: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise RecipeError(f"unknown {cls.__name__} fields {sorted(unknown)}")
    return cls(**d)


def _to_jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_jsonable(v) for v in x]
    return x


# ---- overrides -----------------------------------------------------------------------------------
def parse_value(text: str) -> Any:
    """A Python literal when `text` is one ("3e-4", "True", "None", "[1, 2]"), else the string itself."""
    lowered = text.strip()
    if lowered.lower() in ("true", "false"):
        return lowered.lower() == "true"
    if lowered.lower() in ("none", "null"):
        return None
    try:
        return ast.literal_eval(lowered)
    except (ValueError, SyntaxError):
        return text


def _field_type(obj: Any, name: str) -> Any:
    hints = typing.get_type_hints(type(obj))
    return hints.get(name)


def _coerce(value: Any, annotation: Any, key: str, written: str | None = None) -> Any:
    """Light type check / conversion of an override value against the field annotation."""
    if annotation is None or annotation is Any:
        return value
    origin = typing.get_origin(annotation)
    options = typing.get_args(annotation) if origin in (typing.Union, types.UnionType) else (annotation,)
    if value is None:
        if type(None) in options:
            return None
        raise RecipeError(f"--set {key}=None: the field does not accept None")
    for opt in options:
        if opt is type(None):
            continue
        if opt is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if opt is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if opt is bool and isinstance(value, bool):
            return value
        if opt is str:
            if isinstance(value, str):
                return value
            if (len(options) == 1 or all(o in (str, type(None)) for o in options)) and not isinstance(
                    value, (list, tuple, dict)):  # a list for a path, say: an error below, not a crash later
                return written if written is not None else str(value)
        if typing.get_origin(opt) in (list, tuple) or opt in (list, tuple):
            if isinstance(value, (list, tuple)):
                return value
        if opt is Any:
            return value
    if any(o in (list, tuple, dict) or typing.get_origin(o) in (list, tuple, dict) for o in options):
        return value
    # "int", "float | None": the annotation as written, not "<class 'int'>"
    expected = annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")
    raise RecipeError(f"--set {key}={value!r}: expected {expected}")


def apply_override(config: Any, key: str, value: Any, written: str | None = None) -> None:
    """Sets ``config.a.b.c = value`` (dataclasses all the way down), checking the names and the type.
    `written`: the value as the command line gave it, which a field of type str takes as it is
    ("1e3" stays "1e3", not the literal's "1000.0")."""
    parts = key.split(".")
    obj = config
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(obj):
            raise RecipeError(f"--set {key}: {'.'.join(parts[:i])} is not a config section")
        names = [f.name for f in dataclasses.fields(obj)]
        if part not in names:
            where = ".".join(parts[:i]) or "the run config"
            raise RecipeError(f"--set {key}: {where} has no field {part!r}; fields: {', '.join(names)}")
        if i == len(parts) - 1:
            current = getattr(obj, part)
            if dataclasses.is_dataclass(current) and not isinstance(value, dict):
                raise RecipeError(f"--set {key}: {part!r} is a section; set one of its fields ({key}.<field>=...)")
            if isinstance(value, dict) and dataclasses.is_dataclass(current):
                for k, v in value.items():
                    apply_override(current, k, v)
                return
            setattr(obj, part, _coerce(value, _field_type(obj, part), key, written))
        else:
            obj = getattr(obj, part)


def split_override(text: str) -> tuple[str, Any, str]:
    """(key, the value parsed as a literal, the value as written)."""
    if "=" not in text:
        raise RecipeError(f"override {text!r} must look like key=value")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise RecipeError(f"override {text!r} has an empty key")
    return key, parse_value(value), value.strip()


def _load_module(path: str) -> types.ModuleType:
    if not os.path.isfile(path):
        raise RecipeError(f"config file not found: {path}")
    name = "recipe_" + os.path.splitext(os.path.basename(path))[0].replace(".", "_").replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise RecipeError(f"cannot import config file {path}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - a recipe is user code: its error is bad input, reported in one line
        raise RecipeError(f"{path}: {type(err).__name__}: {err}") from err
    if not hasattr(module, "get_config"):
        raise RecipeError(f"{path} defines no get_config() function")
    return module


def load_recipe(path: str, overrides: Sequence[str] = ()) -> TrainConfig:
    """The run config of a recipe file (``path`` or ``path:arg``) with ``key=value`` overrides applied.

    After the overrides, model and data configs are re-validated (their ``__post_init__``) so a bad
    combination fails here with the config's own message.
    """
    arg = None
    if ":" in os.path.basename(path):
        path, arg = path.rsplit(":", 1)
    module = _load_module(path)
    signature = inspect.signature(module.get_config)
    selectors, field_overrides = {}, []
    for text in overrides:
        key, value, written = split_override(text)
        if "." not in key and key in signature.parameters:
            selectors[key] = value
        else:
            field_overrides.append((key, value, written))
    args = [arg] if arg is not None else []
    try:
        config = module.get_config(*args, **selectors)
    except RecipeError:
        raise
    except Exception as err:  # noqa: BLE001 - as above (a TypeError: wrong arguments)
        raise RecipeError(f"{path}: get_config{tuple(args)} {selectors}: {type(err).__name__}: {err}") from err
    if not isinstance(config, TrainConfig):
        raise RecipeError(f"{path}: get_config() returned {type(config).__name__}, expected TrainConfig")
    for key, value, written in field_overrides:
        apply_override(config, key, value, written)
    config.model.validate()
    if hasattr(config.data, "__post_init__"):
        try:
            config.data.__post_init__()
        except ValueError as err:  # DataConfig's own message, reported as a recipe problem
            raise RecipeError(str(err)) from None
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Checks of the run config that need no devices (device-dependent checks run in the loop)."""
    from manager_jax.train.optimizer import parse_tunable_parts
    from manager_jax.train.step import LOSS_NORMALIZATIONS

    problems = []
    try:
        parse_tunable_parts(config.tunable_parts)
    except ValueError as err:
        problems.append(str(err))
    if config.num_steps < 1:
        problems.append("num_steps must be >= 1")
    if config.loss_normalization not in LOSS_NORMALIZATIONS:
        problems.append(f"loss_normalization must be one of {LOSS_NORMALIZATIONS}")
    if config.batch_shards == 0 or config.batch_shards < -1:
        problems.append("batch_shards must be >= 1 or -1")
    if config.grad_accum == 0 or config.grad_accum < -1:
        problems.append("grad_accum must be >= 1 or -1")
    if config.global_batch_size == 0 or config.global_batch_size < -1:
        problems.append("global_batch_size must be >= 1 or -1")
    if config.global_batch_size == -1 and config.grad_accum == -1:
        problems.append("global_batch_size and grad_accum cannot both be -1 (derived): give one of them")
    if config.logging.every_steps < 1:
        problems.append("logging.every_steps must be >= 1")
    if config.checkpoint.every_steps < 0:
        problems.append("checkpoint.every_steps must be >= 0 (0 = only at the end)")
    if config.checkpoint.keep < 0:
        problems.append("checkpoint.keep must be >= 0 (0 = keep all)")
    if getattr(config.data, "data_path", None) and getattr(config.data, "mixture", None):
        problems.append(
            f"data.data_path ({config.data.data_path}) and data.mixture ({config.data.mixture}) are both set; "
            "give one: --set data.mixture=None to train on data_path, or --set data.data_path=None for the mixture"
        )
    for field, where in (("output_dir", config.output_dir), ("checkpoint.dir", config.checkpoint.dir)):
        if where and _URL.match(where):
            # os.makedirs("gs://b/run") makes a local folder "gs:" and every host would write there.
            problems.append(
                f"{field}={where} is a URL, but the run writes through the local file system: mount the bucket "
                "(e.g. gcsfuse) or use a shared file system every host sees, and give its path"
            )
    if config.stop_at_step is not None and config.stop_at_step < 1:
        problems.append(f"stop_at_step must be >= 1 or None, got {config.stop_at_step}")
    if config.peak_tflops_per_device is not None and not 0 < config.peak_tflops_per_device < math.inf:
        problems.append(f"peak_tflops_per_device must be a number > 0 (the MFU's denominator) or None, "
                        f"got {config.peak_tflops_per_device}")
    for name in ("loss_token_budget", "loss_chunk_size"):
        if getattr(config, name) < 0:
            problems.append(f"{name} must be >= 0 (0 = every position / one chunk)")
    if config.synthetic_records is not None and config.synthetic_records < 1:
        problems.append("synthetic_records must be >= 1, or None to train on data.data_path / data.mixture")
    sizes = config.synthetic_image_sizes
    if sizes is not None and not (isinstance(sizes, (list, tuple)) and sizes and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, int) and x > 0 for x in p)
            for p in sizes)):
        problems.append(f"synthetic_image_sizes must be a list of (width, height) pairs of positive integers, "
                        f"got {sizes!r}")
    if config.eval.every_steps < 0:
        problems.append("eval.every_steps must be >= 0 (0 = at the end of the run only)")
    if config.eval.max_batches < 0:
        problems.append("eval.max_batches must be >= 0 (0 = the whole set)")
    if config.eval.synthetic_records is not None and config.eval.synthetic_records < 1:
        problems.append("eval.synthetic_records must be >= 1 or None")
    given = [f"eval.{name}" for name in ("data_path", "mixture", "synthetic_records") if getattr(config.eval, name)]
    if len(given) > 1:
        problems.append(f"{' and '.join(given)} are set: give one source of the held-out set")
    problems += config.optim.problems()
    if config.max_nonfinite_steps < 1:
        problems.append("max_nonfinite_steps must be >= 1")
    if problems:
        raise RecipeError("invalid run config:\n  - " + "\n  - ".join(problems))


def resolve_batch_layout(config: TrainConfig, data_parallel: int) -> tuple[int, int]:
    """(batch_shards, grad_accum) for a mesh with `data_parallel` = data x fsdp devices."""
    shards = data_parallel if config.batch_shards == -1 else config.batch_shards
    if shards % data_parallel:
        raise RecipeError(
            f"batch_shards={shards} must be a multiple of the data-parallel device count {data_parallel}"
        )
    rows = config.data.rows_per_host
    per_micro = shards * rows
    if config.grad_accum != -1:
        size = per_micro * config.grad_accum
        if config.global_batch_size not in (-1, size):
            raise RecipeError(
                f"global_batch_size={config.global_batch_size}, but batch_shards x data.rows_per_host x grad_accum "
                f"= {shards} x {rows} x {config.grad_accum} = {size}; set grad_accum=-1 to derive it from "
                "global_batch_size, global_batch_size=-1 to derive that, or make them agree"
            )
        return shards, config.grad_accum
    if config.global_batch_size % per_micro:
        raise RecipeError(
            f"global_batch_size={config.global_batch_size} is not a multiple of batch_shards x rows_per_host "
            f"= {shards} x {rows}; set grad_accum explicitly or change the sizes"
        )
    return shards, config.global_batch_size // per_micro


def _source_problems(prefix: str, data_path: str | None, mixture: str | None, image_folder: str | None) -> list[str]:
    """What is missing of a data source (`prefix`.data_path or .mixture, and .image_folder)."""
    from manager_jax.data.records import expand_data_path

    problems = []
    if mixture:
        if not os.path.isfile(mixture):
            problems.append(f"{prefix}.mixture: {mixture}: no such file")
    elif data_path.endswith((".yaml", ".yml")):
        # The original's --data_path takes both; here a mixture has its own field.
        problems.append(f"{prefix}.data_path: {data_path} is a mixture YAML: give it as {prefix}.mixture "
                        f"(--set {prefix}.mixture={data_path} --set {prefix}.data_path=None)")
    else:
        missing = [p for p in expand_data_path(data_path) if not os.path.exists(p)]
        if missing:
            problems.append(f"{prefix}.data_path: {', '.join(missing)}: not found")
    if image_folder and not os.path.isdir(image_folder):
        problems.append(f"{prefix}.image_folder: {image_folder}: no such directory")
    return problems


def check_inputs(config: TrainConfig) -> None:
    """Cheap file-system checks of the run's inputs (init_from, data), before anything is built.

    The data of a synthetic run (`synthetic_records`) is generated later and not checked.
    """
    problems = []
    for directory in [d.strip() for d in (config.init_from or "").split(",") if d.strip()]:
        if not os.path.isdir(directory):
            problems.append(f"init_from: {directory}: no such directory")
    data = config.data
    if config.synthetic_records:
        # The generated set would replace these without a word: the run would not train on them.
        given = [f"data.{name}={getattr(data, name)}" for name in ("data_path", "mixture") if getattr(data, name)]
        if given:
            problems.append(f"{', '.join(given)} is set, but synthetic_records={config.synthetic_records} generates the "
                            "data and would be used instead; add --set synthetic_records=None to train on it")
    elif not (data.mixture or data.data_path):
        problems.append("data.data_path or data.mixture must be set")
    else:
        problems += _source_problems("data", data.data_path, data.mixture, data.image_folder)
    held_out = config.eval
    if held_out.data_path or held_out.mixture:
        problems += _source_problems("eval", held_out.data_path, held_out.mixture, held_out.image_folder)
    if problems:
        raise RecipeError("missing inputs:\n  - " + "\n  - ".join(problems))


# Fields whose change makes a checkpoint another run's: the model (its parameter shapes), what is
# trained (the optimizer state's layout) and where the data comes from (the iterator state indexes it).
_SAME_RUN_FIELDS = ("model.", "tunable_parts", "data.data_path", "data.mixture", "data.format", "data.split",
                    "synthetic_records", "synthetic_image_sizes",
                    # the saved data position is Grain's state, whose layout follows the worker processes
                    "data.worker_count")
# Fields that set the record order, which the saved data state indexes: changed, the run would
# silently repeat some records of the current epoch and never reach others.
_ORDER_FIELDS = ("data.seed", "data.shuffle", "data.group_by_modality_length")
# The grouped order (group_by_modality_length) also follows the step's layout (ordering.py).
_GROUPED_ORDER_FIELDS = ("data.rows_per_host", "grad_accum")
# Model fields that only choose how it runs, not what it is.
_EXECUTION_FIELDS = ("model.dtype", "model.remat_policy", "model.attention_impl", "model.vision_token_multiple")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Where the run lives: moving a run directory is no change.
_LOCATION_FIELDS = ("output_dir", "checkpoint.dir")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _number(value: Any) -> float:
    return value if isinstance(value, (int, float)) else 0.0


def compare_with_saved(saved: dict, new: dict) -> tuple[list[str], list[str]]:
    """(changes that make `new` another run than the checkpoint's `saved` config, other changes),
    each as "field: old -> new", between two `TrainConfig.to_dict()` dicts.

    A synthetic data set is named by its size and seed, not by its path under the output dir.
    """
    old_flat, new_flat = _flat(saved), _flat(new)
    synthetic = bool(saved.get("synthetic_records")) and bool(new.get("synthetic_records"))
    grouped = bool(old_flat.get("data.group_by_modality_length")) or bool(new_flat.get("data.group_by_modality_length"))
    order_fields = _ORDER_FIELDS + (_GROUPED_ORDER_FIELDS if grouped else ())
    other_run, changed = [], []
    for key in sorted(set(old_flat) | set(new_flat)):
        old, cur = old_flat.get(key, "<absent>"), new_flat.get(key, "<absent>")
        if _to_jsonable(old) == _to_jsonable(cur) or key in _LOCATION_FIELDS:
            continue
        if synthetic and key in ("data.data_path", "data.image_folder", "data.mixture"):
            continue
        line = f"{key}: {old!r} -> {cur!r}"
        same_run = key.startswith(_SAME_RUN_FIELDS) and key not in _EXECUTION_FIELDS
        if key in order_fields:
            same_run = True
            line += " (it sets the record order, which the saved data position indexes)"
        if key == "optim.max_grad_norm" and (_number(old) > 0) != (_number(cur) > 0):
            same_run = True
            line += " (clipping turned on or off: the optimizer state the checkpoint holds has another layout)"
        (other_run if same_run else changed).append(line)
    return other_run, changed
