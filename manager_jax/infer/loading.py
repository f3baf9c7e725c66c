"""Loading what inference needs, with clear errors: checkpoints, parameter trees, images, eos ids."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image, UnidentifiedImageError

from manager_jax.config import ModelConfig
from manager_jax.models.llava_ov import LlavaOV


class CheckpointError(FileNotFoundError):
    """A checkpoint that is missing or cannot be read."""


class ImageLoadError(ValueError):
    """An image file that is missing or cannot be decoded."""


def _get(tree: Mapping, path: Sequence):
    node = tree
    for key in path:
        if isinstance(node, Mapping):
            if key in node:
                node = node[key]
            elif str(key) in node:  # trees written as JSON-like dicts have string list indices
                node = node[str(key)]
            else:
                raise KeyError(key)
        else:
            node = node[key]
    return node


def model_from_params(cfg: ModelConfig, params: Mapping, *, dtype: str | None = None) -> LlavaOV:
    """An `LlavaOV` whose parameters are `params` (nested dict of the docs/CONTRACTS.md §3 tree).

    The model is built abstractly (no random init); every leaf must be present with the right
    shape. `dtype` (e.g. "bfloat16") sets the compute and parameter dtype of the returned model.
    """
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
    cfg = cfg.replace(remat_policy="none")
    abstract = nnx.eval_shape(lambda: LlavaOV(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    problems = []

    def fill(path, leaf):
        keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
        name = ".".join(map(str, keys))
        try:
            value = _get(params, keys)
        except (KeyError, IndexError, TypeError):
            problems.append(f"missing parameter {name}")
            return leaf
        if tuple(np.shape(value)) != tuple(leaf.shape):
            problems.append(f"{name}: shape {tuple(np.shape(value))}, expected {tuple(leaf.shape)}")
            return leaf
        return jnp.asarray(value, dtype=leaf.dtype)

    filled = jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state))
    if problems:
        raise ValueError("parameters do not fit the model config:\n  - " + "\n  - ".join(problems[:20]))
    nnx.replace_by_pure_dict(state, filled)
    return nnx.merge(graphdef, state)


def _check_checkpoint_path(checkpoint: str) -> None:
    if not checkpoint or not os.path.exists(checkpoint):
        raise CheckpointError(f"checkpoint not found: {checkpoint!r} (expected a directory written by "
                              "`python -m tools.convert_weights` or by training)")
    if not os.path.isdir(checkpoint):
        raise CheckpointError(f"checkpoint {checkpoint!r} is a file; pass the checkpoint directory")


def params_dir_to_load(checkpoint: str) -> str:
    """The params directory `load_model(checkpoint)` reads now: for a training run, its newest
    complete step's (what an answers file records, so that a later step's answers are not mixed in)."""
    _check_checkpoint_path(checkpoint)
    from manager_jax import params_io

    try:
        return os.path.realpath(params_io.resolve_params_dir(checkpoint)[0])
    except params_io.ParamsError as e:
        raise CheckpointError(f"cannot read checkpoint {checkpoint!r}: {e}") from e


def load_model(checkpoint: str, *, dtype: str | None = None, mesh=None) -> LlavaOV:
    """The model of a checkpoint directory (our params directory or a training checkpoint).

    dtype: compute and parameter dtype (default: the checkpoint config's); arrays are cast while
    they are restored. mesh: restore every parameter directly into its shard on this mesh (the
    rules of `manager_jax.sharding`), so a model larger than one device never lands on one device.
    """
    _check_checkpoint_path(checkpoint)
    from manager_jax import params_io

    try:
        cfg = params_io.load_config(checkpoint)
        # A model trained with an attention kernel this platform lacks runs on its "auto" choice.
        cfg = cfg.runnable_on(mesh.devices.flat[0].platform if mesh is not None else jax.default_backend())
        if dtype is not None:
            cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
        target = None
        if mesh is not None:
            from manager_jax.sharding import tree_shardings

            abstract = params_io.abstract_params(cfg)
            target = jax.tree_util.tree_map(
                lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                abstract, tree_shardings(abstract, mesh),
            )
        _, params = params_io.load_params(checkpoint, target=target, dtype=cfg.param_dtype)
    except (FileNotFoundError, params_io.ParamsError) as e:
        raise CheckpointError(f"cannot read checkpoint {checkpoint!r}: {e}") from e
    try:
        return model_from_params(cfg, params)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {checkpoint!r}: {e}") from e


def load_image(path: str) -> Image.Image:
    """Open an image file fully (so a truncated file fails here, not later), as RGB-convertible PIL."""
    if os.path.isdir(path):
        raise ImageLoadError(f"image {path!r} is a directory, not an image file")
    if not os.path.isfile(path):
        raise ImageLoadError(f"image not found: {path!r}")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    # DecompressionBombError (over 2 x Image.MAX_IMAGE_PIXELS) is not an OSError.
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageLoadError(f"cannot read image {path!r}: {e}") from e


def read_generation_config(checkpoint: str | None) -> dict:
    """The checkpoint's generation_config.json (written by the converter next to the params), or {}."""
    if checkpoint:
        path = os.path.join(checkpoint, "generation_config.json")
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    config = json.load(f)
            except (OSError, ValueError) as e:  # ValueError: not JSON, not UTF-8
                raise CheckpointError(f"cannot read checkpoint {checkpoint!r}: generation_config.json: "
                                      f"not valid JSON ({e})") from None
            if not isinstance(config, dict):
                raise CheckpointError(f"cannot read checkpoint {checkpoint!r}: generation_config.json: expected "
                                      f"an object, got {type(config).__name__}")
            return config
    return {}


def _bad_generation_config(checkpoint: str | None, key: str, value, expected: str) -> CheckpointError:
    return CheckpointError(f"cannot read checkpoint {checkpoint!r}: generation_config.json: {key} must be "
                           f"{expected}, got {value!r}")


def read_eos_ids(checkpoint: str | None, fallback: Sequence[int]) -> list[int]:
    """eos ids of the checkpoint's generation_config.json (SPEC §7.2 step 9), else `fallback`."""
    eos = read_generation_config(checkpoint).get("eos_token_id")
    if eos is not None:
        ids = eos if isinstance(eos, list) else [eos]
        if not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in ids):
            raise _bad_generation_config(checkpoint, "eos_token_id", eos, "a token id or a list of them")
        return [int(e) for e in ids]
    return [int(e) for e in fallback]


def read_repetition_penalty(checkpoint: str | None) -> float:
    """generation_config.json's repetition_penalty (1.0 when absent). HF applies it in greedy mode
    too, so the original evaluation used it whenever the checkpoint had one (SPEC §7.2 step 10)."""
    penalty = read_generation_config(checkpoint).get("repetition_penalty")
    if penalty is None:
        return 1.0
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not 0 < penalty < float("inf"):
        raise _bad_generation_config(checkpoint, "repetition_penalty", penalty, "a number > 0 (1.0 = off)")
    return float(penalty)


# transformers.GenerationConfig's defaults, which HF generate samples with when neither the call
# nor the checkpoint's generation_config.json sets them.
HF_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50}


def read_sampling_defaults(checkpoint: str | None) -> dict:
    """{temperature, top_p, top_k} that HF generate samples with when the call does not give them:
    generation_config.json's values, else `HF_SAMPLING_DEFAULTS`."""
    config, defaults = read_generation_config(checkpoint), {}
    for name, fallback in HF_SAMPLING_DEFAULTS.items():
        value = config.get(name)
        if value is None:
            defaults[name] = fallback
            continue
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        if name == "top_k":
            ok = ok and value == int(value) and value >= 0
        ok = ok and value >= 0 and (name != "top_p" or 0 < value <= 1)
        if not ok:
            raise _bad_generation_config(checkpoint, name, value, {"temperature": "a number >= 0",
                                                                   "top_p": "a number in (0, 1]",
                                                                   "top_k": "an integer >= 0"}[name])
        defaults[name] = int(value) if name == "top_k" else float(value)
    return defaults


def default_vocab_limit(tokenizer, model_vocab: int) -> int:
    """The original evaluation's vocabulary: `resize_token_embeddings(len(tokenizer))` (SPEC §3.9 #8).

    The original tokenizer has no `<image>`/`<video>` tokens (151646 ids for Qwen2); the HF-style
    tokenizers here append them, so ids from `<image>` on are excluded.
    """
    limit = int(tokenizer.vocab_size)
    image_id = getattr(tokenizer, "image_token_id", None)
    if image_id is not None and 0 <= image_id < limit:
        limit = int(image_id)
    return min(limit, int(model_vocab))


class MeshSpecError(ValueError):
    """A --mesh / mesh= value that does not describe a mesh over the available devices."""


def mesh_from_spec(spec: str | None, devices=None):
    """'data=2,tensor=4' -> a Mesh over `devices` (default: all; `manager_jax.sharding`); None / '' -> None.

    Entries may also be written 'data:2/tensor:4' (no ',' nor '=': what survives lmms-eval's
    --model_args parsing). Unnamed axes have size 1, except fsdp, which takes the remaining
    devices unless an axis is -1. An axis named twice is an error.
    """
    if not spec:
        return None
    from manager_jax.sharding import MeshConfig, make_mesh

    sizes = {}
    for part in spec.replace("/", ",").split(","):
        name, _, value = part.replace(":", "=", 1).partition("=")
        name = name.strip()
        # ASCII digits only: str.isdigit also takes '²', and lstrip("-") a doubled sign.
        if name not in ("data", "fsdp", "tensor") or not re.fullmatch(r"-?[0-9]+", value.strip()):
            raise MeshSpecError(f"bad mesh entry {part!r}: expected data=N, fsdp=N or tensor=N (N may be -1; "
                                "also written data:N/tensor:N)")
        if name in sizes:
            raise MeshSpecError(f"mesh {spec!r}: axis {name!r} is given twice")
        sizes[name] = int(value)
    full = {"data": 1, "fsdp": 1, "tensor": 1, **sizes}
    if -1 not in full.values() and "fsdp" not in sizes:
        full["fsdp"] = -1
    try:
        return make_mesh(MeshConfig(**full), devices)
    except ValueError as e:
        raise MeshSpecError(f"mesh {spec!r}: {e}") from e
