"""Model configuration: dataclasses, presets and constructors from original / HF config.json.

Field names follow the original LLaVA-NeXT / Manager config.json where one exists (SPEC §2.1, §6.1),
so a reader can match them one to one.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

MANAGER_TYPES = (
    "static_zerouni",
    "adaptive_zerouni",
    "adaptive_last_zerouni",
    "adaptive_average_zerouni",
    "adaptive_cross_zerouni",
)
GRID_TYPES = ("main", "all", "grid")
CONVENTIONS = ("original", "hf")
# Our HF exports of a model whose image convention is not transformers' record it here (an extra
# config field transformers ignores), so reading the export back restores the model exactly.
HF_CONVENTION_FIELD = "manager_jax_image_convention"
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_acts", "dots_no_batch", "save_attn_out")

# The 36 (width, height) pinpoints of "(1x1),...,(6x6)" with 384-pixel tiles (SPEC §3.3).
ANYRES_MAX_9_PINPOINTS = "(1x1),...,(6x6)"
STAGE_1_5_PINPOINTS = [(384, 768), (768, 384), (768, 768), (1152, 384), (384, 1152)]


class ConfigError(ValueError):
    """A configuration that cannot describe a valid model."""


# The platforms each explicit attention kernel runs on (Splash on CPU: Pallas interpret mode, for
# tests); "auto" and "xla" run everywhere.
ATTENTION_IMPL_PLATFORMS = {"cudnn": ("gpu",), "splash": ("tpu", "cpu")}


def attention_impl_problem(impl: str, platform: str) -> str | None:
    """Why `attention_impl` cannot run on `platform` (jax's name: cpu, gpu, tpu), or None."""
    platforms = ATTENTION_IMPL_PLATFORMS.get(impl)
    if platforms is None or platform in platforms:
        return None
    kernel = "cuDNN's GPU kernel" if impl == "cudnn" else "the TPU Splash kernel"
    return (f"model.attention_impl={impl!r} is {kernel} and the target is {platform}: use 'auto' (cuDNN on GPU, "
            "Splash on TPU, XLA elsewhere) or 'xla'")


def check_attention_impl(impl: str, platform: str) -> None:
    """ConfigError when `attention_impl_problem` finds one (training refuses; inference runs the
    model on "auto": `ModelConfig.runnable_on`)."""
    if problem := attention_impl_problem(impl, platform):
        raise ConfigError(problem)


@dataclass
class VisionConfig:
    """SigLIP vision tower (so400m-patch14-384 by default; the last of 27 layers dropped)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 26
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 384
    layer_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def tokens_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.tokens_per_side**2


@dataclass
class TextConfig:
    """Qwen2 decoder."""

    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_layers: int = 24
    num_heads: int = 14
    num_kv_heads: int = 2
    head_dim: int = 64
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 32768


@dataclass
class ManagerConfig:
    """The Manager plugin (SPEC §2). `type=None` means no Manager (baseline checkpoints)."""

    type: str | None = "static_zerouni"
    grid_type: str = "all"
    vision_select_layers_start: int = 13
    vision_select_layers_interval: int = 1
    vision_select_layers_end: int = 26
    injection_start: int = 0
    injection_interval: int = 4
    injection_end: int = 24
    residual: bool = True
    softmax_temperature: float = 1.0  # stored by the original, never used
    jitter_eps: float = 1e-2  # scores *= U[1-eps, 1+eps) in training

    @property
    def enabled(self) -> bool:
        return self.type is not None

    @property
    def select_layers(self) -> list[int]:
        """Indices into the 27-entry hidden_states tuple (0 = embeddings output)."""
        return list(
            range(
                self.vision_select_layers_start,
                self.vision_select_layers_end,
                self.vision_select_layers_interval,
            )
        )

    def injection_layers(self, num_text_layers: int) -> list[int]:
        return list(
            range(self.injection_start, min(self.injection_end, num_text_layers), self.injection_interval)
        )

    @property
    def query_type(self) -> str | None:
        """None for static; "none" / "last" / "average" / "cross" for adaptive (SPEC §2.7)."""
        if self.type is None or "static" in self.type:
            return None
        name = self.type.replace("_zerouni", "")
        return name.split("adaptive_", 1)[1] if "adaptive_" in name else "none"


@dataclass
class ImageConfig:
    """How images become crops and tokens (SPEC §3)."""

    aspect_ratio: str = "anyres_max_9"  # square | pad | anyres | anyres_max_N
    # String form, or a list of pairs read as `convention` reads them: (w, h) original, (h, w) hf.
    grid_pinpoints: Any = ANYRES_MAX_9_PINPOINTS
    patch_merge_type: str = "spatial_unpad"  # flat | spatial_unpad
    # "original": int() unpad, no newline on single-crop images (the Manager checkpoints).
    # "hf": round(x, 7) unpad, a newline after single-crop images (transformers LlavaOnevision).
    convention: str = "original"

    @property
    def has_newline(self) -> bool:
        return "unpad" in self.patch_merge_type


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    manager: ManagerConfig = field(default_factory=ManagerConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    projector_type: str = "mlp2x_gelu"
    image_token_id: int = 151646  # id of "<image>" in HF-style expanded inputs
    # Numerics and execution.
    dtype: str = "float32"  # activation / matmul dtype ("bfloat16" for training)
    param_dtype: str = "float32"
    scan_layers: bool = True  # each layer stack as one lax.scan; False: unrolled layers
    remat_policy: str = "none"  # REMAT_POLICIES (models/layers.py); the recipes use "full"
    attention_impl: str = "auto"  # ATTENTION_IMPLS; the dispatch is models/attention.py
    # The vision tower's layers run on crops padded to a multiple of this many tokens (exact, the
    # padding is masked); 0 = what the attention prefers (768 for cuDNN on GPU and Splash on TPU,
    # else unpadded).
    vision_token_multiple: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        problems = []
        m, t, v = self.manager, self.text, self.vision
        if m.type is not None and m.type not in MANAGER_TYPES:
            problems.append(f"manager.type {m.type!r} is not one of {MANAGER_TYPES} or None")
        if m.grid_type not in GRID_TYPES:
            problems.append(f"manager.grid_type {m.grid_type!r} is not one of {GRID_TYPES}")
        if m.enabled:
            if not m.residual:
                problems.append("manager.residual must be True (the original builder rejects False)")
            sel = m.select_layers
            if not sel or min(sel) < 0 or max(sel) > v.num_layers:
                problems.append(
                    f"manager select layers {sel} must lie in 0..{v.num_layers} (hidden_states entries)"
                )
            if not m.injection_layers(t.num_layers):
                problems.append("manager injection list is empty")
        if self.image.convention not in CONVENTIONS:
            problems.append(f"image.convention {self.image.convention!r} not in {CONVENTIONS}")
        if self.image.patch_merge_type not in ("flat", "spatial_unpad"):
            problems.append(f"image.patch_merge_type {self.image.patch_merge_type!r} not supported")
        elif (not self.image.has_newline and str(self.image.aspect_ratio).startswith("anyres") and m.enabled
              and m.grid_type == "grid"):
            from manager_jax.multigrid import FLAT_GRID_ERROR

            problems.append(FLAT_GRID_ERROR)
        if t.num_heads % t.num_kv_heads:
            problems.append("text.num_heads must be a multiple of text.num_kv_heads")
        if v.hidden_size % v.num_heads:
            problems.append("vision.hidden_size must be a multiple of vision.num_heads")
        if v.tokens_per_side != 27:
            problems.append("vision image_size // patch_size must be 27 (729 tokens per crop, SPEC §1.1)")
        if self.projector_type != "mlp2x_gelu":
            problems.append(f"projector_type {self.projector_type!r}: only mlp2x_gelu is implemented")
        if self.remat_policy not in REMAT_POLICIES:
            problems.append(f"remat_policy {self.remat_policy!r} not in {REMAT_POLICIES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            problems.append(f"attention_impl {self.attention_impl!r} not in {ATTENTION_IMPLS}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in FLOAT_DTYPES:
                problems.append(f"{name} {getattr(self, name)!r} not in {FLOAT_DTYPES}")
        for part, sub in (("text", t), ("vision", v)):
            for f in dataclasses.fields(sub):
                value = getattr(sub, f.name)
                if f.type in (int, "int") and not value >= 1:  # a zero head_dim divides by zero far from here
                    problems.append(f"{part}.{f.name} must be >= 1, got {value}")
        if self.vision_token_multiple < 0:
            problems.append(f"vision_token_multiple must be >= 0 (0 = automatic), got {self.vision_token_multiple}")
        if problems:
            raise ConfigError("invalid model config:\n  - " + "\n  - ".join(problems))

    @property
    def num_manager_layers(self) -> int:
        return len(self.manager.select_layers) if self.manager.enabled else 0

    def injection_layers(self) -> list[int]:
        return self.manager.injection_layers(self.text.num_layers) if self.manager.enabled else []

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        image = dict(d.pop("image", {}))
        if isinstance(image.get("grid_pinpoints"), list):
            image["grid_pinpoints"] = [tuple(p) for p in image["grid_pinpoints"]]
        return cls(
            vision=VisionConfig(**d.pop("vision", {})),
            text=TextConfig(**d.pop("text", {})),
            manager=ManagerConfig(**d.pop("manager", {})),
            image=ImageConfig(**image),
            **d,
        )

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path: str) -> "ModelConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def replace(self, **kwargs) -> "ModelConfig":
        return dataclasses.replace(self, **kwargs)

    def runnable_on(self, platform: str) -> "ModelConfig":
        """This config with attention_impl "auto" where its kernel cannot run on `platform` (a model
        trained with cuDNN's attention, served on TPU or CPU): the same model, another way to run it."""
        return self.replace(attention_impl="auto") if attention_impl_problem(self.attention_impl, platform) else self

    # ---- constructors from PyTorch config.json ------------------------------------------
    @classmethod
    def from_original_config(cls, cfg: dict, **overrides) -> "ModelConfig":
        """From an original LLaVA-NeXT / Manager config.json (Qwen2Config + mm_* fields, SPEC §6.1)."""
        text = _text_from_qwen2(cfg)
        manager_type = cfg.get("mm_manager_type") if "manager" in cfg.get("model_type", "") or cfg.get(
            "mm_manager_type"
        ) else None
        manager = ManagerConfig(type=None)
        if manager_type:
            manager = ManagerConfig(
                type=manager_type,
                grid_type=cfg.get("mm_manager_grid_type", "all"),
                vision_select_layers_start=cfg.get("mm_manager_vision_select_layers_start", 13),
                vision_select_layers_interval=cfg.get("mm_manager_vision_select_layers_interval", 1),
                vision_select_layers_end=cfg.get("mm_manager_vision_select_layers_end", 26),
                injection_start=cfg.get("mm_manager_injection_start", 0),
                injection_interval=cfg.get("mm_manager_injection_interval", 4),
                injection_end=cfg.get("mm_manager_injection_end", 24),
                residual=cfg.get("mm_manager_residual", True),
                softmax_temperature=cfg.get("mm_manager_softmax_temperature", 1.0),
            )
            recorded = cfg.get("mm_manager_select_layer_index_list")
            if recorded is not None and list(recorded) != manager.select_layers:
                raise ConfigError(
                    f"mm_manager_select_layer_index_list {recorded} disagrees with start/interval/end "
                    f"({manager.select_layers})"
                )
        pinpoints = cfg.get("image_grid_pinpoints")
        if isinstance(pinpoints, str) and not pinpoints.startswith("("):
            pinpoints = ast.literal_eval(pinpoints)
        image = ImageConfig(
            aspect_ratio=cfg.get("image_aspect_ratio", "square") or "square",
            grid_pinpoints=[tuple(p) for p in pinpoints] if isinstance(pinpoints, list) else pinpoints,
            patch_merge_type=cfg.get("mm_patch_merge_type", "flat") or "flat",
            convention="original",
        )
        vision = _vision_from_siglip(cfg.get("vision_config") or {})
        base = cls(vision=vision, text=text, manager=manager, image=image,
                   projector_type=cfg.get("mm_projector_type") or "mlp2x_gelu")
        return base.replace(**overrides) if overrides else base

    @classmethod
    def from_hf_config(cls, cfg: dict, **overrides) -> "ModelConfig":
        """From a transformers LlavaOnevisionConfig dict (pinpoints there are (h, w))."""
        text = _text_from_qwen2(cfg["text_config"])
        if "tie_word_embeddings" in cfg:
            text.tie_word_embeddings = bool(cfg["tie_word_embeddings"])
        vision = _vision_from_siglip(cfg["vision_config"])
        # The features are hidden_states[vision_feature_layer] of the declared tower: we run the
        # layers up to that one (26 of so400m's 27 for LLaVA-OV's -2, all 26 for -1 of 26).
        vision.num_layers = _feature_layers(cfg, vision.num_layers)
        _refuse_unless(cfg, "projector_hidden_act", "gelu", "gelu")
        _refuse_unless(cfg, "multimodal_projector_bias", True, True)
        pin = cfg.get("image_grid_pinpoints")
        convention = cfg.get(HF_CONVENTION_FIELD, "hf")
        if pin:  # HF pairs are (h, w); an original-convention model reads (w, h)
            pin = [(int(a), int(b)) for a, b in pin] if convention == "hf" else [(int(w), int(h)) for h, w in pin]
        image = ImageConfig(
            aspect_ratio=cfg.get("vision_aspect_ratio", "anyres_max_9"),
            grid_pinpoints=pin or ANYRES_MAX_9_PINPOINTS,
            patch_merge_type="spatial_unpad",
            convention=convention,
        )
        base = cls(
            vision=vision,
            text=text,
            manager=ManagerConfig(type=None),
            image=image,
            image_token_id=cfg.get("image_token_id", cfg.get("image_token_index", 151646)),
        )
        return base.replace(**overrides) if overrides else base

    @classmethod
    def from_json_file(cls, path: str, **overrides) -> "ModelConfig":
        """Detects our own, original or HF config.json."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            cfg = json.load(f)
        if "text" in cfg and "vision" in cfg:
            return cls.from_dict(cfg).replace(**overrides) if overrides else cls.from_dict(cfg)
        if "text_config" in cfg:
            return cls.from_hf_config(cfg, **overrides)
        return cls.from_original_config(cfg, **overrides)


def _refuse_unless(cfg: dict, key: str, default, supported) -> None:
    """A config.json setting our model does not implement: refused, not read as the default."""
    value = cfg.get(key, default)
    if value != supported:
        raise ConfigError(f"{key}={value!r} is not supported (only {supported!r} is implemented)")


def _feature_layers(cfg: dict, declared: int) -> int:
    """How many SigLIP layers an HF LlavaOnevision config uses: hidden_states[vision_feature_layer]
    of its `declared`-layer tower, taken whole ("full": SigLIP has no CLS token to drop)."""
    _refuse_unless(cfg, "vision_feature_select_strategy", "full", "full")  # absent: transformers' defaults
    layer = cfg.get("vision_feature_layer", -1)
    if isinstance(layer, bool) or not isinstance(layer, int) or not (-declared <= layer <= declared) or layer == 0:
        raise ConfigError(f"vision_feature_layer={layer!r}: only one encoder layer's output of the {declared}-layer "
                          "SigLIP tower is supported")
    return declared + 1 + layer if layer < 0 else layer


def _refuse_unsupported_qwen2(cfg: dict) -> None:
    """Qwen2 settings that transformers implements and our decoder does not."""
    _refuse_unless(cfg, "hidden_act", "silu", "silu")
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"rope scaling {rope_type!r} is not supported (only plain RoPE is implemented)")
    # As transformers' Qwen2Config: the window exists only with use_sliding_window; layers from
    # max_window_layers on use it, unless layer_types names them.
    if cfg.get("use_sliding_window") and cfg.get("sliding_window") is not None:
        n = cfg.get("num_hidden_layers", 24)
        types = cfg.get("layer_types") or ["sliding_attention" if i >= cfg.get("max_window_layers", 28) else
                                           "full_attention" for i in range(n)]
        if "sliding_attention" in types[:n]:
            raise ConfigError(f"use_sliding_window with sliding_window={cfg['sliding_window']} is not supported "
                              "(sliding window attention is not implemented)")


def _text_from_qwen2(cfg: dict) -> TextConfig:
    _refuse_unsupported_qwen2(cfg)
    # save_pretrained leaves out values equal to Qwen2Config's defaults, so an absent rope_theta or
    # tie_word_embeddings means those (1e4, untied), as transformers reads it; shapes are checked
    # against the tensors, these two are not.
    hidden = cfg.get("hidden_size", 896)
    heads = cfg.get("num_attention_heads", 14)
    return TextConfig(
        vocab_size=cfg.get("vocab_size", 151936),
        hidden_size=hidden,
        intermediate_size=cfg.get("intermediate_size", 4864),
        num_layers=cfg.get("num_hidden_layers", 24),
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads", heads),
        head_dim=cfg.get("head_dim") or hidden // heads,
        rope_theta=float(cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        max_position_embeddings=cfg.get("max_position_embeddings", 32768),
    )


def _vision_from_siglip(cfg: dict) -> VisionConfig:
    d = VisionConfig()
    _refuse_unless(cfg, "hidden_act", "gelu_pytorch_tanh", "gelu_pytorch_tanh")
    return VisionConfig(
        hidden_size=cfg.get("hidden_size", d.hidden_size),
        intermediate_size=cfg.get("intermediate_size", d.intermediate_size),
        num_layers=cfg.get("num_hidden_layers", d.num_layers),
        num_heads=cfg.get("num_attention_heads", d.num_heads),
        patch_size=cfg.get("patch_size", d.patch_size),
        image_size=cfg.get("image_size", d.image_size),
        layer_norm_eps=cfg.get("layer_norm_eps", d.layer_norm_eps),
    )


# ---- presets ------------------------------------------------------------------------------
VARIANTS = ("baseline", "manager", "grid", "grid_manager")

_TEXT_PRESETS = {
    "0.5b": TextConfig(),
    "7b": TextConfig(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
        num_kv_heads=4, head_dim=128, tie_word_embeddings=False,
    ),
    "72b": TextConfig(
        vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_layers=80, num_heads=64,
        num_kv_heads=8, head_dim=128, tie_word_embeddings=False,
    ),
}


def preset(size: str = "0.5b", variant: str = "grid_manager", **overrides) -> ModelConfig:
    """The four released variants (SPEC §8) at 0.5B / 7B / 72B shapes."""
    if size not in _TEXT_PRESETS:
        raise ConfigError(f"unknown size {size!r}; choose from {sorted(_TEXT_PRESETS)}")
    if variant not in VARIANTS:
        raise ConfigError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    text = dataclasses.replace(_TEXT_PRESETS[size])
    grid = variant.startswith("grid")
    # Every size injects before layers 0, 4, ..., 20: the scripts set MANAGER_INJECTION_END=24 for
    # any MODEL_SCALE (train.py's comment "28 for 7B" is not what they run: --set
    # model.manager.injection_end=28 gives that).
    manager = ManagerConfig(injection_end=24) if variant.endswith("manager") else ManagerConfig(type=None)
    image = (
        ImageConfig()
        if grid
        else ImageConfig(aspect_ratio="square", grid_pinpoints=None, patch_merge_type="flat")
    )
    cfg = ModelConfig(vision=VisionConfig(), text=text, manager=manager, image=image)
    return cfg.replace(**overrides) if overrides else cfg


def tiny(variant: str = "grid_manager", manager_type: str = "static_zerouni", **overrides) -> ModelConfig:
    """A small config for tests and the demo: 4 vision layers, 4 text layers, width 64."""
    text = TextConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
        head_dim=16, rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=16384,
    )
    vision = VisionConfig(hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4)
    grid = variant.startswith("grid")
    manager = (
        ManagerConfig(
            type=manager_type, vision_select_layers_start=1, vision_select_layers_end=5,
            injection_start=0, injection_interval=2, injection_end=4,
        )
        if variant.endswith("manager")
        else ManagerConfig(type=None)
    )
    image = (
        ImageConfig()
        if grid
        else ImageConfig(aspect_ratio="square", grid_pinpoints=None, patch_merge_type="flat")
    )
    cfg = ModelConfig(vision=vision, text=text, manager=manager, image=image, image_token_id=500)
    return cfg.replace(**overrides) if overrides else cfg
