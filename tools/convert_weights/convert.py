"""The conversions: PyTorch checkpoint -> our params directory, and back.

Both directions read the same mapping table (mapping.py), validate everything before writing,
stream tensor by tensor, write into a temporary directory and rename it only once the written
result has been read back and checked.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from manager_jax import params_io
from manager_jax.config import ModelConfig
from manager_jax.multigrid import parse_mode
from manager_jax.data.tokenizer import SPECIAL_TOKEN_IDS, load_tokenizer, save_offline_tokenizer
from tools.convert_weights import configs_out, mapping
from tools.convert_weights.orbax_io import CONVERSION_RECORD, SOURCE_CONFIG, TOKENIZER_DIR, OrbaxSource
from tools.convert_weights.safetensors_io import (
    DTYPE_NAMES,
    SafetensorsCheckpoint,
    SafetensorsError,
    TensorPlan,
    write_checkpoint,
)
from tools.convert_weights.sources import (
    ConversionError,
    ConversionFailed,
    TorchSource,
    aux_files,
    detect_format,
    open_torch_source,
)

DTYPE_CHOICES = {"keep": None, "bf16": np.dtype(ml_dtypes.bfloat16), "fp32": np.dtype(np.float32)}
# Exports also take fp16, the dtype the original evaluates its checkpoints in. Our own params keep to
# bf16 / fp32 (an fp16 source is kept as such): JAX training and inference gain nothing from fp16
# storage but its narrower range.
EXPORT_DTYPE_CHOICES = {**DTYPE_CHOICES, "fp16": np.dtype(np.float16)}
FP16_MAX = float(np.finfo(np.float16).max)
Progress = Callable[[str], None] | None

logger = logging.getLogger(__name__)


def _dtype_choice(dtype: str, choices: dict = DTYPE_CHOICES) -> np.dtype | None:
    if dtype not in choices:
        raise ConversionError("--dtype", [f"--dtype {dtype!r}: choose from {', '.join(choices)}"])
    return choices[dtype]


def _sources(src: str, *more: str | None) -> list[str]:
    """The paths a conversion reads: SRC (each part of SIGLIP_DIR,QWEN_DIR too) and e.g. --tokenizer."""
    return [src, *src.split(","), *(m for m in more if m)]


def _check_destination(dst: str, overwrite: bool, source: str, sources: list[str]) -> None:
    if not dst.strip():  # e.g. an unset shell variable: it would name the working directory
        raise ConversionError(source, ["the destination DST is empty"])
    # Checked before the source is opened, not when the write begins (bad input: status 2).
    problem = params_io.destination_problem(dst)
    if problem:
        raise ConversionError(source, [problem])
    target = params_io.resolve_destination(dst)
    if not os.path.lexists(target):
        return
    if not os.path.isdir(target):  # --overwrite replaces an earlier output, a folder: not a file that is there
        raise ConversionError(source, [f"destination {dst} is a file; the output is a directory: remove the file "
                                       "or give another path"])
    if not overwrite:
        raise ConversionError(source, [_exists(dst)])
    problem = params_io.overlap_problem(dst, sources)
    if problem:
        raise ConversionError(source, [f"--overwrite would delete what is being converted: {problem}"])


def _exists(dst: str) -> str:
    return f"destination {dst} already exists (pass --overwrite to replace it)"


# What reading the source or writing the output raises when a file system fails (disk full, quota,
# no permission, a file that went away: an OSError, or TensorStore's ValueError for the same causes).
_IO_ERRORS = (OSError, ValueError)


def _io_failed(dst: str, err: Exception) -> ConversionFailed:
    """An I/O failure mid-conversion as one error naming its cause (not whether it was the read or
    the write: both end here); the temporary output is already removed."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0].split(" [tensorstore_spec=")[0]
    return ConversionFailed(dst, [f"reading or writing failed ({type(err).__name__}: {first}); nothing was written"])


@contextlib.contextmanager
def _writing(src: str, dst: str):
    """Turns what writing DST raises into ConversionErrors (the temporary output is already removed)."""
    try:
        yield
    except params_io.DestinationExists:  # created by someone else since _check_destination
        raise ConversionError(src, [_exists(dst)]) from None
    except params_io.ParamsError as e:
        raise ConversionError(src, [str(e)]) from None
    except ConversionError:
        raise
    except _IO_ERRORS as e:
        raise _io_failed(dst, e) from e


# ---- fresh parameters (stage-1 starting point, SPEC §1.2, §1.3, §2.2) -----------------------------

# How the original initialises the parts a SigLIP + Qwen2 start does not contain:
# - projector: created by initialize_vision_modules after from_pretrained, so torch's default
#   nn.Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias;
# - image_newline and manager_layer_embedding: randn / sqrt(D) (llava_arch.py);
# - layer_scores and zero_gate: zeros (the "ZeroInit" managers);
# - adaptive controllers and fusion projections: created inside from_pretrained and missing from the
#   Qwen2 checkpoint, so HF's _init_weights: N(0, 0.02) weights, zero biases.
_FRESH_INIT = {
    "projector.linear1.kernel": "torch_linear",
    "projector.linear1.bias": "torch_linear_bias",
    "projector.linear2.kernel": "torch_linear",
    "projector.linear2.bias": "torch_linear_bias",
    "image_newline": "randn_sqrt_d",
    "manager.layer_embedding": "randn_sqrt_d",
    "manager.blocks.{j}.layer_scores": "zeros",
    "manager.blocks.{j}.zero_gate": "zeros",
    "manager.blocks.{j}.controller.kernel": "normal_0.02",
    "manager.blocks.{j}.fusion_q.kernel": "normal_0.02",
    "manager.blocks.{j}.fusion_q.bias": "zeros",
    "manager.blocks.{j}.fusion_k.kernel": "normal_0.02",
    "manager.blocks.{j}.fusion_k.bias": "zeros",
}


def fresh_param(spec: mapping.ParamSpec, cfg: ModelConfig, rng: np.random.Generator) -> np.ndarray:
    """One freshly initialised parameter (fp32), drawn in the torch layout then mapped to ours."""
    kind = _FRESH_INIT[spec.rule.path]
    tshape = mapping.tensor_specs(spec)[0].torch_shape
    d = cfg.text.hidden_size
    if kind == "zeros":
        x = np.zeros(tshape, np.float32)
    elif kind == "randn_sqrt_d":
        x = rng.standard_normal(tshape, dtype=np.float32) / np.float32(np.sqrt(d))
    elif kind == "normal_0.02":
        x = rng.standard_normal(tshape, dtype=np.float32) * np.float32(0.02)
    elif kind in ("torch_linear", "torch_linear_bias"):
        # The bias shares the weight's fan_in: the input width of the same Linear.
        fan_in = cfg.vision.hidden_size if spec.rule.path.startswith("projector.linear1") else d
        bound = 1.0 / np.sqrt(fan_in)
        x = rng.uniform(-bound, bound, tshape).astype(np.float32)
    else:
        raise ValueError(f"no initialiser for {spec.rule.path}")
    return np.ascontiguousarray(mapping.to_jax(x, spec.transform))


# ---- PyTorch -> tree --------------------------------------------------------------------------------


def _param_dtypes(source: TorchSource, dtype: np.dtype | None) -> tuple[dict[tuple, np.dtype], list[str]]:
    """Target dtype per parameter; with "keep" the layers of a stacked parameter must agree."""
    out, problems = {}, []
    fresh_dtype = dtype or source.source_dtype()
    fresh = {s.path for s in source.fresh}
    for spec in mapping.param_specs(source.config):
        if spec.path in fresh:
            out[spec.path] = fresh_dtype
            continue
        if dtype is not None:
            out[spec.path] = dtype
            continue
        names = {source.refs[t.key].info.dtype for t in mapping.tensor_specs(spec)}
        if len(names) > 1:
            problems.append(f"{spec.dotted}: its layers are stored in different dtypes ({', '.join(sorted(names))}); "
                            "pass --dtype bf16 or fp32")
        out[spec.path] = np.dtype(source.refs[mapping.tensor_specs(spec)[0].key].info.numpy_dtype)
    return out, problems


def streamed_tree(source: TorchSource, dtype: str = "keep", *, seed: int = 0, progress: Progress = None,
                  non_finite: list[str] | None = None) -> dict:
    """The tree of `source` with every converted parameter as a `params_io.StreamedArray`: its
    tensors are read (each through its own memory map, released right after use) only while it is
    written, one layer at a time, so saving it holds one tensor in memory, not the model.
    `non_finite` collects the names of the tensors read that hold NaN or inf."""
    dtypes, problems = _param_dtypes(source, _dtype_choice(dtype))
    if problems:
        raise ConversionError(source.path, problems)
    cfg = source.config
    tree: dict = {}
    fresh = {s.path for s in source.fresh}
    seen_files: set[str] = set()

    def reader(spec: mapping.ParamSpec) -> Callable[[int | None], np.ndarray]:
        tensors = mapping.tensor_specs(spec)

        def read(layer: int | None) -> np.ndarray:
            t = tensors[layer or 0]
            ref = source.refs[t.key]
            if progress and ref.info.file not in seen_files:
                seen_files.add(ref.info.file)
                progress(f"reading {os.path.basename(ref.info.file)}")
            value = mapping.to_jax(ref.checkpoint.read(ref.file_key), spec.transform)
            if non_finite is not None and not np.isfinite(value).all():
                non_finite.append(ref.file_key)  # as the file names it
            return value

        return read

    for spec in mapping.param_specs(cfg):
        if spec.path not in fresh:
            leaf = params_io.StreamedArray(tuple(spec.shape), dtypes[spec.path], reader(spec),
                                           layered=spec.stack is not None)
            mapping.set_path(tree, spec.path, leaf)
    rng = np.random.default_rng(seed)
    for spec in source.fresh:
        mapping.set_path(tree, spec.path, fresh_param(spec, cfg, rng).astype(dtypes[spec.path]))
    return tree


def build_tree(source: TorchSource, dtype: str = "keep", *, seed: int = 0) -> dict:
    """`streamed_tree` read into memory: one numpy array per parameter."""
    def materialize(leaf):
        if not isinstance(leaf, params_io.StreamedArray):
            return leaf
        if not leaf.layered:
            return np.asarray(leaf.read(None)).astype(leaf.dtype)
        arr = np.empty(leaf.shape, leaf.dtype)
        for i in range(leaf.shape[0]):
            arr[i] = leaf.read(i)  # casts to the target dtype on assignment (round-to-nearest-even)
        return arr

    return _map_leaves(materialize, streamed_tree(source, dtype, seed=seed))


def _map_leaves(fn: Callable, tree: dict) -> dict:
    return {k: _map_leaves(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def load_torch_checkpoint(
    src: str, fmt: str | None = None, dtype: str = "keep", *, seed: int = 0, **kwargs
) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params tree of numpy arrays) of a PyTorch checkpoint, in memory, writing nothing.

    `kwargs` (variant, model_config) apply to siglip+qwen2 sources.
    """
    source = open_torch_source(src, fmt or detect_format(src), **kwargs)
    return source.config, build_tree(source, dtype, seed=seed)


def _record(source: TorchSource | OrbaxSource, dtype: str, extra: dict | None = None) -> bytes:
    if isinstance(source, TorchSource):
        rec = {"source": os.path.basename(os.path.normpath(source.path.split(",")[0])), "format": source.kind,
               "layout": source.layout, "dtype": dtype, "ignored_tensors": source.ignored,
               "fresh_parameters": [s.dotted for s in source.fresh]}
    else:
        rec = {"source": os.path.basename(os.path.normpath(source.path)), "format": "orbax", "dtype": dtype,
               "origin": source.record}
    rec.update(extra or {})
    return json.dumps(rec, indent=2).encode()


def to_orbax(
    src: str,
    dst: str,
    *,
    fmt: str | None = None,
    dtype: str = "keep",
    overwrite: bool = False,
    seed: int = 0,
    variant: str = "baseline",
    model_config: ModelConfig | dict | None = None,
    progress: Progress = None,
) -> ModelConfig:
    """Converts any supported checkpoint into a params directory at `dst` (atomically).

    fmt: "llava", "hf", "siglip+qwen2" (src = "SIGLIP_DIR,QWEN_DIR") or "orbax" (a params dir or
    training checkpoint: takes the latest step, e.g. to change the dtype); None = detect.
    variant / model_config / seed: only for siglip+qwen2 (which Manager / grid settings to build).
    """
    _dtype_choice(dtype)
    fmt = fmt or detect_format(src)
    _check_destination(dst, overwrite, src, _sources(src))
    if fmt == "orbax":
        return _orbax_to_orbax(src, dst, dtype, overwrite, progress)
    kwargs = {"variant": variant, "model_config": model_config} if fmt == "siglip+qwen2" else {}
    source = open_torch_source(src, fmt, **kwargs)
    if progress:
        progress(f"{source.kind} checkpoint ({source.layout} names), {len(source.refs)} tensors, "
                 f"{source.total_bytes() / 1e9:.2f} GB; {len(source.ignored)} ignored")
    non_finite: list[str] = []
    tree = streamed_tree(source, dtype, seed=seed, progress=progress, non_finite=non_finite)
    extra: dict[str, str | bytes] = {CONVERSION_RECORD: _record(source, dtype)}
    if source.kind in ("llava", "hf"):
        extra[SOURCE_CONFIG] = json.dumps(source.raw_config, indent=2).encode()
    _add_aux(extra, source.aux)
    if progress:
        progress(f"writing Orbax params to {dst}")
    with _writing(src, dst):
        params_io.save_params(dst, tree, source.config, extra_files=extra, overwrite=overwrite,
                              sources=_sources(src))
    if non_finite:  # copied as they are (a conversion does not edit weights); such a model's logits are NaN
        logger.warning("%d tensors of %s hold NaN or inf values, converted as they are: %s", len(non_finite), src,
                       ", ".join(non_finite[:5]) + (", ..." if len(non_finite) > 5 else ""))
    return source.config


def _add_aux(extra: dict, files: dict[str, str]) -> None:
    """Tokenizer / generation files go to tokenizer/ (an HF tokenizer folder); generation_config.json
    also to the root, where inference reads the eos ids (SPEC §7.2 step 9)."""
    for name, path in files.items():
        extra[f"{TOKENIZER_DIR}/{name}"] = path
        if name == "generation_config.json":
            extra[name] = path


def _orbax_to_orbax(src: str, dst: str, dtype: str, overwrite: bool, progress: Progress) -> ModelConfig:
    source = OrbaxSource(src)
    target = _dtype_choice(dtype)
    tree: dict = {}
    for spec in source.specs:
        leaf = params_io.StreamedArray(tuple(spec.shape), target or source.dtype(spec.path),
                                       functools.partial(source.read, spec.path), layered=spec.stack is not None)
        mapping.set_path(tree, spec.path, leaf)
    extra: dict[str, str | bytes] = {CONVERSION_RECORD: _record(source, dtype)}
    if source.source_config is not None:
        extra[SOURCE_CONFIG] = json.dumps(source.source_config, indent=2).encode()
    tok = source.tokenizer_dir()
    if tok:
        _add_aux(extra, aux_files(tok))
    if progress:
        progress(f"writing Orbax params to {dst}")
    try:
        with _writing(src, dst):
            params_io.save_params(dst, tree, source.config, extra_files=extra, overwrite=overwrite,
                                  sources=_sources(src))
    finally:
        source.release()
    return source.config


# ---- tree -> PyTorch --------------------------------------------------------------------------------


@dataclass
class ExportPlan:
    layout: str
    tensors: list[TensorPlan]
    config_json: dict


def parse_size(text: str | int) -> int:
    """"5GB", "500MB", "2GiB" or a byte count; ConversionError unless it is a positive size."""
    t = str(text).strip().upper()
    units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    unit = next((u for u in units if t.endswith(u)), "")
    try:
        size = int(float(t[: len(t) - len(unit)]) * units.get(unit, 1))
    except (ValueError, OverflowError):
        size = 0
    if size <= 0:
        raise ConversionError("--max-shard-size", [f"--max-shard-size {text!r}: expected a positive size such as "
                                                   "5GB, 500MB, 2GiB or a byte count"])
    return size


def _export_layout(source: OrbaxSource, fmt: str, hf_naming: str) -> str:
    if fmt == "llava":
        return "llava"
    if hf_naming == "auto":
        origin = source.record if source.record.get("format") != "orbax" else source.record.get("origin", {})
        layout = origin.get("layout")
        return layout if layout in ("hf", "hf_legacy") else "hf"
    return {"v5": "hf", "legacy": "hf_legacy"}[hf_naming]


CONVENTION_CHANGE = (
    "this model uses the {convention!r} image convention (int() unpad rounding, no newline after single-crop "
    "images: the Manager checkpoints, SPEC §3.9 #1 and #4), but transformers' LlavaOnevision always preprocesses "
    "with its own (round(x, 7) unpad, a newline after every single-crop image): run by transformers, the export "
    "would see a different number of image tokens for some images (e.g. +1 per image in multi-image prompts). "
    "Export as --format llava to keep the model exact, or pass --accept-hf-convention to export anyway (the "
    "config.json records the {convention!r} convention, so to-orbax reads the export back as this model)"
)


def plan_export(source: OrbaxSource, fmt: str, dtype: str = "keep", hf_naming: str = "auto",
                accept_hf_convention: bool = False) -> ExportPlan:
    """Validates an export and lists the tensors to write (data produced lazily).

    An hf export of a model whose image convention is not "hf" is refused unless
    `accept_hf_convention` (transformers would preprocess its images differently)."""
    target = _dtype_choice(dtype, EXPORT_DTYPE_CHOICES)
    cfg = source.config
    problems = []
    if fmt not in ("llava", "hf"):
        problems.append(f"--format {fmt!r}: export formats are llava and hf")
    if hf_naming not in ("auto", "v5", "legacy"):
        problems.append(f"--hf-naming {hf_naming!r}: choose auto, v5 or legacy")
    if fmt == "hf" and not cfg.image.has_newline:
        problems.append("transformers LlavaOnevision always has an image_newline, but this model "
                        f"(mm_patch_merge_type={cfg.image.patch_merge_type!r}) has none: export it as --format llava")
    elif fmt == "hf" and parse_mode(cfg.image.aspect_ratio)[1] is None:
        # Its processor tiles every image, and the model reads N from the name (int("") for anyres).
        problems.append("transformers LlavaOnevision runs only vision_aspect_ratio 'anyres_max_<N>', but this model "
                        f"has image_aspect_ratio={cfg.image.aspect_ratio!r}: export it as --format llava")
    elif fmt == "hf" and cfg.image.convention != "hf" and not accept_hf_convention:
        problems.append(CONVENTION_CHANGE.format(convention=cfg.image.convention))
    if problems:
        raise ConversionError(source.path, problems)
    layout = _export_layout(source, fmt, hf_naming)
    plans: list[TensorPlan] = []
    dtypes = []
    for spec in source.specs:
        out_dtype = target or source.dtype(spec.path)
        for t in mapping.tensor_specs(spec):
            name = mapping.to_layout(t.key, layout)
            plans.append(TensorPlan(name, t.torch_shape, out_dtype, _producer(source, t, out_dtype, name)))
            dtypes.append((out_dtype, t.torch_shape))
    main_dtype = max({d for d, _ in dtypes}, key=lambda d: sum(np.prod(s) for dd, s in dtypes if dd == d))
    origin = source.record if source.record.get("format") != "orbax" else source.record.get("origin", {})
    base = source.source_config if origin.get("format") == fmt else None
    if fmt == "llava":
        config_json = configs_out.original_config(cfg, main_dtype, base)
    else:
        config_json = configs_out.hf_config(cfg, main_dtype, base)
    return ExportPlan(layout, plans, config_json)


def _producer(source: OrbaxSource, t: mapping.TensorSpec, dtype: np.dtype, name: str) -> Callable[[], np.ndarray]:
    def produce() -> np.ndarray:
        value = np.ascontiguousarray(mapping.to_torch(source.read(t.param.path, t.layer), t.param.transform))
        with np.errstate(over="ignore"):  # an overflow is reported below, naming the tensor
            out = value.astype(dtype, copy=False)
        if dtype == np.float16 and value.dtype != dtype:
            _check_fits_fp16(source.path, name, value, out)
        return out

    return produce


def _check_fits_fp16(src: str, name: str, value: np.ndarray, out: np.ndarray) -> None:
    """A finite value the fp16 cast turned into inf (|x| >= 65520) would be a silently broken export:
    refused, naming the tensor (the partial output is removed by write_atomically)."""
    overflow = np.isinf(out) & np.isfinite(value)
    if overflow.any():
        largest = float(np.max(np.abs(np.asarray(value, np.float32)[overflow])))
        raise ConversionError(src, [f"{name} holds {int(overflow.sum())} value(s) beyond float16's range "
                                    f"(|x| up to {largest:.6g} > {FP16_MAX:g}): --dtype fp16 would write inf; "
                                    "export with --dtype bf16 or fp32; nothing was written"])


def from_orbax(
    src: str,
    dst: str,
    *,
    fmt: str,
    dtype: str = "keep",
    tokenizer: str | None = None,
    hf_naming: str = "auto",
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    progress: Progress = None,
    accept_hf_convention: bool = False,
) -> list[str]:
    """Exports a params directory (or the latest step of a training checkpoint) as safetensors.

    fmt "llava": the original layout + an original config.json (mm_* / mm_manager_* fields);
    fmt "hf": transformers llava-onevision names (`hf_naming` "v5" = what 5.x save_pretrained
    writes, "legacy" = 4.4x hub names, "auto" = the source's if it was HF, else v5) + an HF
    LlavaOnevisionConfig. Tokenizer files come from `tokenizer`, else from the params directory,
    else from the training run's data.tokenizer_path, else (a Qwen2 vocabulary) the offline Qwen2
    tokenizer is written; a generation_config.json (eos ids) and, for hf, a preprocessor_config.json
    are written when those files bring none.
    fmt "hf" of a model with the original image convention needs `accept_hf_convention` (see
    `plan_export`); its config then records the convention for the way back.
    Returns the written file names.
    """
    _check_destination(dst, overwrite, src, _sources(src, tokenizer))
    if tokenizer is not None and not os.path.isdir(tokenizer):
        raise ConversionError(src, [f"--tokenizer {tokenizer}: not a directory"])
    max_bytes = parse_size(max_shard_size)
    source = OrbaxSource(src)
    plan = plan_export(source, fmt, dtype, hf_naming, accept_hf_convention)
    tok_dir = tokenizer or source.tokenizer_dir() or _training_tokenizer(source)
    # A model with Qwen2's vocabulary and no tokenizer folder (a training run's checkpoint) was
    # trained and is run here with the offline Qwen2 tokenizer: the export carries that one.
    qwen_vocab = source.config.text.vocab_size > max(SPECIAL_TOKEN_IDS.values())
    written: list[str] = []

    def fill(tmp: str) -> None:
        written.extend(write_checkpoint(tmp, plan.tensors, max_shard_bytes=max_bytes, progress=progress))
        source.release()
        if tok_dir:
            for name, path in aux_files(tok_dir).items():
                shutil.copyfile(path, os.path.join(tmp, name))
                written.append(name)
        elif qwen_vocab:
            written.extend(save_offline_tokenizer(tmp))
        extra = {}
        generation = _generation_ids(tok_dir, qwen_vocab) if "generation_config.json" not in written else None
        if generation:  # where inference (ours and HF generate) reads the ids that end an answer
            extra["generation_config.json"] = generation
        if fmt == "hf" and "preprocessor_config.json" not in written:
            extra["preprocessor_config.json"] = configs_out.hf_preprocessor_config(source.config)
        for name, content in {**extra, "config.json": plan.config_json}.items():
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(content, f, indent=2)
        written.extend(n for n in extra)
        _verify_written(tmp, plan)

    with _writing(src, dst):
        params_io.write_atomically(dst, fill, overwrite=overwrite, sources=_sources(src, tokenizer))
    return written + ["config.json"]


def _generation_ids(tok_dir: str | None, qwen_vocab: bool) -> dict | None:
    """eos / pad ids of the exported tokenizer, or None when the export carries none."""
    if tok_dir is None and not qwen_vocab:
        return None
    try:
        tok = load_tokenizer(tok_dir)
    except (ValueError, OSError):  # e.g. a folder holding only an image processor's config
        return None
    return {"eos_token_id": list(tok.eos_ids), "pad_token_id": tok.pad_id}


def _training_tokenizer(source: OrbaxSource) -> str | None:
    """The tokenizer folder a training checkpoint's run used (its recipe's data.tokenizer_path)."""
    recipe = os.path.join(os.path.dirname(source.item), "recipe", "metadata")
    if not os.path.exists(recipe):
        return None
    with open(recipe) as f:
        path = (json.load(f).get("data") or {}).get("tokenizer_path")
    return path if path and os.path.isdir(path) else None


def _verify_written(directory: str, plan: ExportPlan) -> None:
    """Re-reads the written headers: every planned tensor, with its shape and dtype, nothing else."""
    try:
        ckpt = SafetensorsCheckpoint(directory)
    except SafetensorsError as e:
        raise ConversionFailed(directory, [f"written checkpoint does not read back: {e}"]) from None
    problems = []
    planned = {p.name: p for p in plan.tensors}
    if set(ckpt.keys()) != set(planned):
        problems.append("written tensor names differ from the plan")
    for name, p in planned.items():
        if name in ckpt:
            info = ckpt.info(name)
            if info.shape != tuple(p.shape) or info.dtype != DTYPE_NAMES[np.dtype(p.dtype)]:
                problems.append(f"{name}: written {info.dtype}{list(info.shape)}, planned {list(p.shape)}")
    if problems:
        raise ConversionFailed(directory, problems)
