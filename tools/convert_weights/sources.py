"""PyTorch checkpoints as conversion sources: format detection, the model config, and validation.

Opening a source checks everything that can be checked without reading tensor data (headers,
shards, config fields against tensor names and shapes, dtypes) and raises ONE ConversionError
listing every problem. A returned `TorchSource` maps every parameter of our tree to the tensors
that make it up, ready to be streamed.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from manager_jax.config import (
    ConfigError,
    ImageConfig,
    ManagerConfig,
    ModelConfig,
    VisionConfig,
)
from manager_jax import params_io
from tools.convert_weights import mapping
from tools.convert_weights.safetensors_io import (
    DTYPES,
    FLOAT_DTYPES,
    INDEX_FILE,
    SafetensorsCheckpoint,
    SafetensorsError,
    TensorInfo,
)

FORMATS = ("llava", "hf", "siglip+qwen2", "orbax")
VARIANTS = ("baseline", "manager", "grid", "grid_manager")
# Files that are never copied as tokenizer / generation files.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf")
_AUX_MAX_BYTES = 64 * 1024**2
SIGLIP_DEFAULT_HEADS = {1152: 16}  # so400m; other widths need a vision_config or a 72-wide head


class ConversionError(Exception):
    """Bad input for a conversion. `problems` lists every issue found; nothing has been written."""

    def __init__(self, source: str, problems: Iterable[str]):
        self.source = source
        self.problems = list(problems)
        super().__init__(str(self))

    def __str__(self) -> str:
        n = len(self.problems)
        lines = "\n".join("  - " + p.replace("\n", "\n    ") for p in self.problems)
        return f"cannot convert {self.source}: {n} problem{'s' if n != 1 else ''}\n{lines}"


class ConversionFailed(ConversionError):
    """The conversion ran but what it wrote does not read back as planned (a bug, not bad input);
    the output has been removed."""


# ---- detection ----------------------------------------------------------------------------------


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(path, [f"{os.path.basename(path)} is not valid JSON: {e}"]) from None


def _config_kind(cfg: dict) -> str | None:
    model_type = str(cfg.get("model_type", ""))
    if model_type in ("siglip", "siglip_vision_model"):
        return "siglip"
    if "text_config" in cfg or model_type == "llava_onevision":
        return "hf"
    if model_type.startswith("llava") or any(k.startswith("mm_") for k in cfg):
        return "llava"
    if model_type == "qwen2":
        return "qwen2"
    if "text" in cfg and "vision" in cfg:
        return "ours"
    return None


def split_pair(src: str) -> tuple[str, str] | None:
    """"SIGLIP_DIR,QWEN_DIR" -> the two paths, else None."""
    if "," not in src:
        return None
    parts = [p.strip() for p in src.split(",")]
    if len(parts) != 2 or not all(parts):
        raise ConversionError(src, ["siglip+qwen2 sources are given as SIGLIP_DIR,QWEN_DIR"])
    return parts[0], parts[1]


def detect_format(src: str) -> str:
    """One of FORMATS for a path (or "SIGLIP_DIR,QWEN_DIR"); ConversionError when unrecognised."""
    if split_pair(src):
        return "siglip+qwen2"
    if not os.path.exists(src):
        raise ConversionError(src, [f"{src} does not exist"])
    if os.path.isdir(src) and params_io.is_params_dir(src):
        return "orbax"
    directory = src if os.path.isdir(src) else os.path.dirname(src)
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.exists(cfg_path):
        raise ConversionError(src, [f"no config.json in {directory}: cannot tell the format (nor the model shape)"])
    kind = _config_kind(read_json(cfg_path))
    if kind in ("llava", "hf"):
        return kind
    if kind in ("siglip", "qwen2"):
        raise ConversionError(src, [
            f"{src} is a bare {'SigLIP' if kind == 'siglip' else 'Qwen2'} checkpoint: convert it together with the "
            "other tower as --format siglip+qwen2 SIGLIP_DIR,QWEN_DIR"])
    raise ConversionError(src, [f"config.json of {src} is neither an original LLaVA-NeXT/Manager config "
                                "(mm_* fields), an HF llava_onevision config, nor one of ours"])


def aux_files(directory: str) -> dict[str, str]:
    """Tokenizer, chat template and generation files of a checkpoint directory (name -> path)."""
    out = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if not os.path.isfile(path) or name in ("config.json", INDEX_FILE) or name.endswith(_WEIGHT_SUFFIXES):
            continue
        if name.startswith(".") or os.path.getsize(path) > _AUX_MAX_BYTES:
            continue
        out[name] = path
    return out


# ---- sources --------------------------------------------------------------------------------------


@dataclass
class TensorRef:
    """Where the data of one torch tensor comes from."""

    checkpoint: SafetensorsCheckpoint
    file_key: str

    @property
    def info(self) -> TensorInfo:
        return self.checkpoint.info(self.file_key)


@dataclass
class TorchSource:
    """A validated PyTorch checkpoint: its config and, per original key, where its data lives."""

    path: str
    kind: str  # "llava" | "hf" | "siglip+qwen2"
    layout: str  # key layout of the (main) checkpoint
    config: ModelConfig
    raw_config: dict  # the source config.json (siglip+qwen2: {"siglip": ..., "qwen2": ...})
    refs: dict[str, TensorRef]  # original key -> data
    fresh: list[mapping.ParamSpec] = field(default_factory=list)  # initialised, not read (siglip+qwen2)
    ignored: list[str] = field(default_factory=list)  # file keys skipped on purpose, with the reason
    aux: dict[str, str] = field(default_factory=dict)  # tokenizer / generation files
    checkpoints: list[SafetensorsCheckpoint] = field(default_factory=list)

    def source_dtype(self) -> np.dtype:
        """The dtype most of the bytes are stored in (used for freshly initialised parameters)."""
        sizes: dict[str, int] = {}
        for ref in self.refs.values():
            sizes[ref.info.dtype] = sizes.get(ref.info.dtype, 0) + ref.info.nbytes
        return DTYPES[max(sizes, key=sizes.get)] if sizes else np.dtype(np.float32)

    def total_bytes(self) -> int:
        return sum(ref.info.nbytes for ref in self.refs.values())


def _open_checkpoint(path: str, problems: list[str]) -> SafetensorsCheckpoint | None:
    try:
        return SafetensorsCheckpoint(path)
    except SafetensorsError as e:
        problems.extend(str(e).split("\n"))
        return None
    except OSError as e:
        problems.append(f"cannot read {path}: {e}")
        return None


def _layer_indices(keys: Iterable[str], prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pattern.match(k))})


def _describe_range(idx: list[int]) -> str:
    if not idx:
        return "none"
    contiguous = idx == list(range(idx[0], idx[-1] + 1))
    return f"{idx[0]}..{idx[-1]} ({len(idx)})" if contiguous else f"{idx} ({len(idx)})"


def infer_vision_config(canon: Mapping[str, TensorInfo], declared: dict | None) -> tuple[VisionConfig | None, list[str]]:
    """SigLIP dimensions from the tensors (the original config.json only names the tower's path)."""
    v = mapping._V
    pos = canon.get(v + "embeddings.position_embedding.weight")
    patch = canon.get(v + "embeddings.patch_embedding.weight")
    fc1 = canon.get(v + "encoder.layers.0.mlp.fc1.weight")
    if pos is None or patch is None or fc1 is None:
        return None, ["no SigLIP vision tower tensors (embeddings / encoder.layers.0) found"]
    layers = _layer_indices(canon, v + "encoder.layers.")
    width = pos.shape[1]
    side = math.isqrt(pos.shape[0])
    declared = declared or {}
    heads = declared.get("num_attention_heads") or SIGLIP_DEFAULT_HEADS.get(width)
    if heads is None:
        if width % 72:
            return None, [f"cannot infer the SigLIP head count for width {width}: add a vision_config "
                          "{num_attention_heads: ...} to config.json"]
        heads = width // 72
    vc = VisionConfig(
        hidden_size=width,
        intermediate_size=fc1.shape[0],
        num_layers=len(layers),
        num_heads=heads,
        patch_size=patch.shape[2],
        # Only image_size // patch is recorded by the tensors; so400m's 384 (27 x 14 + 6) when consistent.
        image_size=384 if 384 // patch.shape[2] == side else side * patch.shape[2],
        layer_norm_eps=declared.get("layer_norm_eps", 1e-6),
    )
    return vc, []


def _manager_from_fields(raw: dict, text_layers: int) -> ManagerConfig:
    """The Manager config of mm_manager_* fields (original config.json, or kept in an HF config)."""
    fields = {k: v for k, v in raw.items() if k.startswith("mm_manager")}
    fields.update(model_type="llava_qwen_manager", num_hidden_layers=text_layers)
    return ModelConfig.from_original_config(fields).manager


def _check_against_config(
    cfg: ModelConfig,
    canon: Mapping[str, TensorInfo],
    file_key: Callable[[str], str],
    raw: dict,
    problems: list[str],
    parts: Iterable[str] | None = None,
) -> list[mapping.ParamSpec]:
    """Config-vs-tensor checks with explanations, then missing / unexpected / shape / dtype checks."""
    specs = mapping.param_specs(cfg, parts)
    wanted_parts = set(parts) if parts is not None else {"vision", "projector", "image_newline", "text", "lm_head",
                                                          "manager"}
    # Counts first: they explain whole families of missing or unexpected tensors.
    if "text" in wanted_parts:
        found = _layer_indices(canon, "model.layers.")
        if found != list(range(cfg.text.num_layers)):
            problems.append(f"config num_hidden_layers={cfg.text.num_layers} but the checkpoint has decoder layers "
                            f"{_describe_range(found)}")
        emb = canon.get("model.embed_tokens.weight")
        if emb is not None and len(emb.shape) == 2 and emb.shape[0] != cfg.text.vocab_size:
            problems.append(f"config vocab_size={cfg.text.vocab_size} but {file_key('model.embed_tokens.weight')} has "
                            f"{emb.shape[0]} rows")
        if emb is not None and len(emb.shape) == 2 and emb.shape[1] != cfg.text.hidden_size:
            problems.append(f"config hidden_size={cfg.text.hidden_size} but {file_key('model.embed_tokens.weight')} is "
                            f"{emb.shape[1]} wide")
    if "vision" in wanted_parts:
        found = _layer_indices(canon, mapping._V + "encoder.layers.")
        if found != list(range(cfg.vision.num_layers)):
            problems.append(f"config vision num_hidden_layers={cfg.vision.num_layers} but the checkpoint has SigLIP "
                            f"layers {_describe_range(found)}")
    if "image_newline" in wanted_parts:
        has = "model.image_newline" in canon
        if has != cfg.image.has_newline:
            problems.append(
                f"config mm_patch_merge_type={cfg.image.patch_merge_type!r} "
                + ("expects an image_newline tensor, the checkpoint has none" if cfg.image.has_newline
                   else f"has no image_newline but the checkpoint has {file_key('model.image_newline')}")
            )
    if "manager" in wanted_parts:
        blocks = _layer_indices(canon, "model.manager.")
        has_manager = bool(blocks) or "model.manager_layer_embedding" in canon
        if has_manager and not cfg.manager.enabled:
            problems.append("the checkpoint has Manager tensors (model.manager.*) but the config has no mm_manager_type")
        if cfg.manager.enabled:
            inj = cfg.injection_layers()
            if blocks != list(range(len(inj))):
                problems.append(f"config injection layers {inj} need {len(inj)} managers but the checkpoint has "
                                f"managers {_describe_range(blocks)} (model.manager.N.*)")
            emb = canon.get("model.manager_layer_embedding")
            if emb is not None and emb.shape and emb.shape[0] != cfg.num_manager_layers:
                problems.append(f"config selects vision layers {cfg.manager.select_layers} "
                                f"({cfg.num_manager_layers}) but model.manager_layer_embedding has {emb.shape[0]} rows")
            recorded = raw.get("mm_manager_index_list")
            if recorded is not None and list(recorded) != inj:
                problems.append(f"config mm_manager_index_list {recorded} disagrees with injection start/interval/end "
                                f"({inj})")
    # Generic: every expected tensor present with the right shape and a float dtype.
    expected: dict[str, mapping.TensorSpec] = {t.key: t for p in specs for t in mapping.tensor_specs(p)}
    missing = [file_key(k) for k in expected if k not in canon]
    unexpected = [file_key(k) for k in canon if k not in expected]
    if missing:
        problems.append("missing tensors:\n" + "\n".join(mapping.summarize_keys(missing)))
    if unexpected:
        problems.append("unexpected tensors:\n" + "\n".join(mapping.summarize_keys(unexpected)))
    bad_shapes, bad_dtypes = [], []
    for key, t in expected.items():
        info = canon.get(key)
        if info is None:
            continue
        if tuple(info.shape) != t.torch_shape:
            bad_shapes.append(f"{file_key(key)}: {list(info.shape)} in the checkpoint, the config implies "
                              f"{list(t.torch_shape)}")
        if info.dtype not in FLOAT_DTYPES:
            bad_dtypes.append(f"{file_key(key)}: dtype {info.dtype}, expected a float type ({'/'.join(FLOAT_DTYPES)})")
    if bad_shapes:
        shown = bad_shapes[:20] + ([f"... and {len(bad_shapes) - 20} more"] if len(bad_shapes) > 20 else [])
        problems.append("shape mismatches:\n" + "\n".join(shown))
    if bad_dtypes:
        problems.append("dtype problems:\n" + "\n".join(bad_dtypes[:20]))
    return specs


def _canonical(ckpt: SafetensorsCheckpoint, layout: str, ignore: Callable[[str], str | None] | None,
               ignored: list[str]) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """original key -> info, and original key -> file key; `ignore(file_key)` returns a reason to skip."""
    canon, names = {}, {}
    for key in ckpt.keys():
        reason = ignore(key) if ignore else None
        if reason:
            ignored.append(f"{key} ({reason})")
            continue
        orig = mapping.from_layout(key, layout)
        canon[orig] = ckpt.info(key)
        names[orig] = key
    return canon, names


def _tied_lm_head(ckpt: SafetensorsCheckpoint, lm_head_key: str, embed_key: str, problems: list[str]) -> str:
    """The reason to skip a stored lm_head under a tied config, or a problem when it is not the embedding:
    transformers then keeps the two apart, so dropping it would convert another model."""
    if embed_key in ckpt:
        head, embed = ckpt.read(lm_head_key), ckpt.read(embed_key)
        rows = 4096  # compared in blocks of rows: both are memory maps, the largest tensors of the model
        if head.shape != embed.shape or not all(np.array_equal(head[i:i + rows], embed[i:i + rows])
                                                for i in range(0, head.shape[0], rows)):
            problems.append(f"config.json ties the word embeddings (tie_word_embeddings true) but {lm_head_key} "
                            f"differs from {embed_key}: set tie_word_embeddings to false to keep it")
    return "tied to the embedding"


def _hf_layout(keys: list[str]) -> str:
    if any(k.startswith("vision_tower.vision_model.") for k in keys):
        return "hf_legacy"
    if any(k.startswith(("model.vision_tower.", "model.language_model.")) for k in keys):
        return "hf_memory"
    return "hf"


def open_llava_or_hf(src: str, kind: str) -> TorchSource:
    """An original LLaVA-NeXT / Manager checkpoint (kind "llava") or a transformers one (kind "hf")."""
    directory = src if os.path.isdir(src) else os.path.dirname(src)
    raw = read_json(os.path.join(directory, "config.json"))
    problems: list[str] = []
    actual = _config_kind(raw)
    if actual != kind:
        raise ConversionError(src, [f"--format {kind} but config.json looks like {actual or 'an unknown model'}"])
    ckpt = _open_checkpoint(src, problems)
    if ckpt is None:
        raise ConversionError(src, problems)
    layout = "llava" if kind == "llava" else _hf_layout(ckpt.keys())
    try:
        cfg = _llava_config(raw, ckpt, problems) if kind == "llava" else _hf_config(raw)
    except (ConfigError, TypeError, ValueError) as e:
        problems.append(f"config.json: {e}")
        cfg = None
    if cfg is None:
        raise ConversionError(src, problems)
    lm_head_key = mapping.to_layout("lm_head.weight", layout)
    embed_key = mapping.to_layout("model.embed_tokens.weight", layout)
    vision_layer = re.compile(re.escape(mapping.to_layout(mapping._V + "encoder.layers.", layout)) + r"(\d+)\.")
    declared_layers = (raw.get("vision_config") or {}).get("num_hidden_layers") if kind == "hf" else None

    def ignore(key: str) -> str | None:
        if key == lm_head_key and cfg.text.tie_word_embeddings:
            return _tied_lm_head(ckpt, lm_head_key, embed_key, problems)
        m = vision_layer.match(key)
        # An HF config declaring more SigLIP layers than its vision_feature_layer reads (so400m's 27
        # with -2, SPEC §1.1): the layers after that one are unused.
        if m and declared_layers is not None and declared_layers > cfg.vision.num_layers \
                and int(m.group(1)) >= cfg.vision.num_layers:
            return "SigLIP layer after vision_feature_layer, unused by LLaVA-OneVision"
        return None

    ignored: list[str] = []
    canon, names = _canonical(ckpt, layout, ignore, ignored)
    _check_against_config(cfg, canon, lambda k: names.get(k, mapping.to_layout(k, layout)), raw, problems)
    if problems:
        raise ConversionError(src, problems)
    refs = {k: TensorRef(ckpt, names[k]) for k in canon}
    return TorchSource(src, kind, layout, cfg, raw, refs, ignored=ignored, aux=aux_files(directory),
                       checkpoints=[ckpt])


def _llava_config(raw: dict, ckpt: SafetensorsCheckpoint, problems: list[str]) -> ModelConfig | None:
    """ModelConfig of an original config.json; SigLIP dimensions come from the tensors when not declared."""
    canon, _ = _canonical(ckpt, "llava", None, [])
    declared = raw.get("vision_config")
    vision, vproblems = infer_vision_config(canon, declared)
    problems.extend(vproblems)
    if vision is None:
        return None
    overrides: dict = {} if declared else {"vision": vision}
    if "image_token_index" in raw:
        overrides["image_token_id"] = int(raw["image_token_index"])
    return ModelConfig.from_original_config(raw, **overrides)


def _hf_config(raw: dict) -> ModelConfig:
    cfg = ModelConfig.from_hf_config(raw)
    if raw.get("mm_manager_type"):  # Manager settings kept as extra fields (our HF export)
        cfg = cfg.replace(manager=_manager_from_fields(raw, cfg.text.num_layers))
    return cfg


def _siglip_vision(raw: dict) -> dict:
    return raw.get("vision_config", raw) if raw.get("model_type") == "siglip" else raw


def open_siglip_qwen2(
    siglip_dir: str,
    qwen_dir: str,
    *,
    variant: str = "baseline",
    model_config: ModelConfig | dict | None = None,
) -> TorchSource:
    """A SigLIP checkpoint + a Qwen2 checkpoint: the stage-1 starting point.

    The SigLIP tower loses its last layer and its head (SPEC §1.1); the projector, image_newline and
    Manager are freshly initialised. `variant` picks the Manager / grid settings with their defaults;
    `model_config` (a ModelConfig or its dict, whose vision/text sections are ignored) gives them
    explicitly, e.g. for small test models.
    """
    name = f"{siglip_dir},{qwen_dir}"
    problems: list[str] = []
    raws = {}
    for label, d, kinds in (("SigLIP", siglip_dir, ("siglip",)), ("Qwen2", qwen_dir, ("qwen2",))):
        path = os.path.join(d, "config.json")
        if not os.path.exists(path):
            problems.append(f"{label} checkpoint {d}: no config.json")
            continue
        raw = read_json(path)
        if _config_kind(raw) not in kinds:
            problems.append(f"{d}: config.json has model_type {raw.get('model_type')!r}, expected a {label} model")
        raws[label] = raw
    if problems:
        raise ConversionError(name, problems)
    sraw, qraw = _siglip_vision(raws["SigLIP"]), raws["Qwen2"]
    siglip_layers = int(sraw.get("num_hidden_layers", 27))
    vision = VisionConfig(
        hidden_size=sraw.get("hidden_size", 1152),
        intermediate_size=sraw.get("intermediate_size", 4304),
        num_layers=siglip_layers - 1,  # LLaVA-OneVision deletes the last layer at load
        num_heads=sraw.get("num_attention_heads", 16),
        patch_size=sraw.get("patch_size", 14),
        image_size=sraw.get("image_size", 384),
        layer_norm_eps=sraw.get("layer_norm_eps", 1e-6),
    )
    try:
        text = ModelConfig.from_original_config(dict(qraw, model_type="qwen2")).text
        if model_config is not None:
            base = model_config.to_dict() if isinstance(model_config, ModelConfig) else dict(model_config)
            base.pop("vision", None)
            base.pop("text", None)
            cfg = ModelConfig.from_dict(base).replace(vision=vision, text=text)
        else:
            cfg = _variant_config(variant, vision, text)
    except (ConfigError, TypeError, ValueError) as e:
        hint = "" if model_config is not None else (
            "\n(--variant uses the released settings, e.g. select layers 13..25; pass --model-config for other shapes)")
        raise ConversionError(name, [f"model config: {e}{hint}"]) from None
    s_ckpt = _open_checkpoint(siglip_dir, problems)
    q_ckpt = _open_checkpoint(qwen_dir, problems)
    if s_ckpt is None or q_ckpt is None:
        raise ConversionError(name, problems)
    s_layout = "siglip" if any(k.startswith("vision_model.") for k in s_ckpt.keys()) else "siglip_bare"
    prefix = "vision_model." if s_layout == "siglip" else ""
    ignored: list[str] = []

    def ignore_siglip(key: str) -> str | None:
        if key.startswith("text_model.") or key in ("logit_scale", "logit_bias"):
            return "SigLIP text tower"
        if key.startswith(prefix + "head."):
            return "SigLIP attention-pooling head, replaced by Identity"
        m = re.match(re.escape(prefix) + r"encoder\.layers\.(\d+)\.", key)
        if m and int(m.group(1)) == siglip_layers - 1:
            return "last SigLIP layer, dropped by LLaVA-OneVision"
        return None

    def ignore_qwen(key: str) -> str | None:
        if key == "lm_head.weight" and cfg.text.tie_word_embeddings:
            return _tied_lm_head(q_ckpt, key, "model.embed_tokens.weight", problems)
        return None

    s_canon, s_names = _canonical(s_ckpt, s_layout, ignore_siglip, ignored)
    q_canon, q_names = _canonical(q_ckpt, "qwen2", ignore_qwen, ignored)
    _check_against_config(cfg, s_canon, lambda k: "SigLIP " + s_names.get(k, mapping.to_layout(k, s_layout)), sraw,
                          problems, parts=["vision"])
    _check_against_config(cfg, q_canon, lambda k: "Qwen2 " + q_names.get(k, k), qraw, problems,
                          parts=["text", "lm_head"])
    if problems:
        raise ConversionError(name, problems)
    refs = {k: TensorRef(s_ckpt, s_names[k]) for k in s_canon}
    refs.update({k: TensorRef(q_ckpt, q_names[k]) for k in q_canon})
    fresh = mapping.param_specs(cfg, ["projector", "image_newline", "manager"])
    aux = aux_files(qwen_dir)
    return TorchSource(name, "siglip+qwen2", "siglip+qwen2", cfg, {"siglip": raws["SigLIP"], "qwen2": qraw}, refs,
                       fresh=fresh, ignored=ignored, aux=aux, checkpoints=[s_ckpt, q_ckpt])


def _variant_config(variant: str, vision: VisionConfig, text) -> ModelConfig:
    if variant not in VARIANTS:
        raise ConfigError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    grid = variant.startswith("grid")
    manager = ManagerConfig(injection_end=text.num_layers) if variant.endswith("manager") else ManagerConfig(type=None)
    image = ImageConfig() if grid else ImageConfig(aspect_ratio="square", grid_pinpoints=None, patch_merge_type="flat")
    return ModelConfig(vision=vision, text=text, manager=manager, image=image)


def open_torch_source(src: str, fmt: str | None = None, **kwargs) -> TorchSource:
    """Opens and validates any PyTorch source; `kwargs` go to `open_siglip_qwen2`."""
    fmt = fmt or detect_format(src)
    if fmt == "siglip+qwen2":
        pair = split_pair(src)
        if pair is None:
            raise ConversionError(src, ["--format siglip+qwen2 needs SRC as SIGLIP_DIR,QWEN_DIR (or --siglip/--qwen)"])
        return open_siglip_qwen2(*pair, **kwargs)
    if fmt in ("llava", "hf"):
        if not os.path.exists(src):
            raise ConversionError(src, [f"{src} does not exist"])
        return open_llava_or_hf(src, fmt)
    raise ConversionError(src, [f"format {fmt!r} is not a PyTorch checkpoint format (llava, hf, siglip+qwen2)"])
