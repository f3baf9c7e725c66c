"""config.json for the PyTorch outputs: the original LLaVA-NeXT / Manager layout and transformers'
LlavaOnevisionConfig.

When the params directory came from a checkpoint of the same format, its config.json (kept as
`source_config.json`) is the starting point, so fields we do not model (training records, the
vision tower path, ...) survive a round trip; every field we do model is rewritten from the
ModelConfig.
"""

from __future__ import annotations

import numpy as np

from manager_jax.config import HF_CONVENTION_FIELD, ModelConfig, VisionConfig
from manager_jax.multigrid import parse_pinpoints

SIGLIP_TOWER = "google/siglip-so400m-patch14-384"
QWEN_BOS, QWEN_EOS = 151643, 151645
DEFAULT_IMAGE_TOKEN, DEFAULT_VIDEO_TOKEN = 151646, 151647


def torch_dtype_name(dtype: np.dtype) -> str:
    return {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32", "float64": "float64"}[
        np.dtype(dtype).name
    ]


def expand_pinpoints(pinpoints) -> list[list[int]] | None:
    """Our pinpoints (any form ImageConfig.grid_pinpoints takes) as the expanded list of pairs
    (SPEC §3.3), in the reading of the model's convention; the model's own parser, so that every
    form the model accepts is exported."""
    return None if pinpoints is None else [list(p) for p in parse_pinpoints(pinpoints)]


def _pinpoints_read_as(cfg: ModelConfig, convention: str) -> list[list[int]] | None:
    """The model's pinpoint pairs for a reader of `convention`: the original reads (w, h), transformers
    (h, w); the pairs are swapped when the model's own convention is the other one."""
    pinpoints = expand_pinpoints(cfg.image.grid_pinpoints)
    if pinpoints is None or cfg.image.convention == convention:
        return pinpoints
    return [[b, a] for a, b in pinpoints]


def manager_fields(cfg: ModelConfig) -> dict:
    """The mm_manager_* fields the original writes (SPEC §2.1), index lists included."""
    m = cfg.manager
    return {
        "mm_manager_type": m.type,
        "mm_manager_grid_type": m.grid_type,
        "mm_manager_vision_select_layers_start": m.vision_select_layers_start,
        "mm_manager_vision_select_layers_interval": m.vision_select_layers_interval,
        "mm_manager_vision_select_layers_end": m.vision_select_layers_end,
        "mm_manager_injection_start": m.injection_start,
        "mm_manager_injection_interval": m.injection_interval,
        "mm_manager_injection_end": m.injection_end,
        "mm_manager_residual": m.residual,
        "mm_manager_softmax_temperature": m.softmax_temperature,
        "mm_manager_select_layer_index_list": m.select_layers,
        "mm_manager_index_list": cfg.injection_layers(),
    }


def _vision_is_default(v: VisionConfig) -> bool:
    return v == VisionConfig()


def original_config(cfg: ModelConfig, dtype: np.dtype, base: dict | None = None) -> dict:
    """An original-layout config.json (LlavaQwen(Manager)Config = Qwen2Config + mm_* fields, SPEC §6.1)."""
    out = dict(base or {})
    if not cfg.manager.enabled:
        for key in [k for k in out if k.startswith("mm_manager")]:
            del out[key]
    t, v = cfg.text, cfg.vision
    manager = cfg.manager.enabled
    out.update(
        architectures=["LlavaQwenManagerForCausalLM" if manager else "LlavaQwenForCausalLM"],
        model_type="llava_qwen_manager" if manager else "llava_qwen",
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads,
        vocab_size=t.vocab_size,
        rope_theta=t.rope_theta,
        rms_norm_eps=t.rms_norm_eps,
        tie_word_embeddings=t.tie_word_embeddings,
        max_position_embeddings=t.max_position_embeddings,
        hidden_act="silu",
        torch_dtype=torch_dtype_name(dtype),
        mm_hidden_size=v.hidden_size,
        mm_projector_type=cfg.projector_type,
        mm_patch_merge_type=cfg.image.patch_merge_type,
        image_aspect_ratio=cfg.image.aspect_ratio,
        image_grid_pinpoints=_pinpoints_read_as(cfg, "original"),
    )
    if t.head_dim * t.num_heads != t.hidden_size:
        out["head_dim"] = t.head_dim
    defaults = {
        "attention_dropout": 0.0,
        "bos_token_id": QWEN_BOS,
        "eos_token_id": QWEN_EOS,
        "initializer_range": 0.02,
        "max_window_layers": t.num_layers,
        "rope_scaling": None,
        "sliding_window": None,
        "use_sliding_window": False,
        "use_cache": True,
        "mm_vision_tower": SIGLIP_TOWER,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_resampler_type": None,
        "use_mm_proj": True,
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "mm_newline_position": "grid",
        "mm_spatial_pool_mode": "bilinear",
        "tokenizer_padding_side": "right",
        "tokenizer_model_max_length": 16384,
    }
    for key, value in defaults.items():
        out.setdefault(key, value)
    if manager:
        out.update(manager_fields(cfg))
    # Not in the original: SigLIP dimensions are only recorded when they are not so400m's, since
    # the original config.json names the tower by path and readers infer the rest from tensors.
    declared = out.pop("vision_config", None) or {}
    if not _vision_is_default(v):
        out["vision_config"] = {**declared, **_siglip_core(v)}
    if cfg.image_token_id != DEFAULT_IMAGE_TOKEN:
        out["image_token_index"] = cfg.image_token_id
    return out


def _siglip_core(v: VisionConfig) -> dict:
    return {
        "model_type": "siglip_vision_model",
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_layers,
        "num_attention_heads": v.num_heads,
        "patch_size": v.patch_size,
        "image_size": v.image_size,
        "layer_norm_eps": v.layer_norm_eps,
    }


def _siglip_dict(v: VisionConfig) -> dict:
    return {**_siglip_core(v), "hidden_act": "gelu_pytorch_tanh", "vision_use_head": False}


def hf_config(cfg: ModelConfig, dtype: np.dtype, base: dict | None = None) -> dict:
    """A transformers LlavaOnevisionConfig as a dict (pinpoints as (h, w)), built by transformers itself."""
    from transformers import LlavaOnevisionConfig

    base = base or {}
    t, v = cfg.text, cfg.vision
    text_config = dict(base.get("text_config") or {})
    text_config.update(
        model_type="qwen2",
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads,
        max_position_embeddings=t.max_position_embeddings,
        rms_norm_eps=t.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta},
        tie_word_embeddings=t.tie_word_embeddings,
        hidden_act="silu",
    )
    text_config.pop("rope_theta", None)
    text_config.pop("torch_dtype", None)
    if "dtype" in text_config:  # the base's is the source's; the export may have another
        text_config["dtype"] = torch_dtype_name(dtype)
    text_config.pop("layer_types", None)  # derived from num_hidden_layers by transformers
    if t.head_dim * t.num_heads != t.hidden_size:
        text_config["head_dim"] = t.head_dim
    text_config.setdefault("use_sliding_window", False)
    pinpoints = _pinpoints_read_as(cfg, "hf")
    hf = LlavaOnevisionConfig(
        text_config=text_config,
        vision_config=_siglip_dict(v),
        image_token_index=cfg.image_token_id,
        video_token_index=base.get(
            "video_token_index",
            DEFAULT_VIDEO_TOKEN if cfg.image_token_id == DEFAULT_IMAGE_TOKEN else cfg.image_token_id + 1,
        ),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio=cfg.image.aspect_ratio,
        image_grid_pinpoints=pinpoints,
        tie_word_embeddings=t.tie_word_embeddings,
        multimodal_projector_bias=True,
    )
    hf.architectures = ["LlavaOnevisionForConditionalGeneration"]
    out = hf.to_diff_dict()  # what save_pretrained writes
    out["dtype"] = torch_dtype_name(dtype)
    out.pop("torch_dtype", None)
    if cfg.manager.enabled:  # no HF counterpart: kept as extra fields, read back by our converter
        out.update(manager_fields(cfg))
    if cfg.image.convention != "hf":  # transformers ignores it; our converter restores the model's own
        out[HF_CONVENTION_FIELD] = cfg.image.convention
    return out


def hf_preprocessor_config(cfg: ModelConfig) -> dict:
    """preprocessor_config.json of an hf export: transformers' LlavaOnevision image processor set up
    as our pipeline preprocesses (manager_jax/data/image_processing.py, pixels.py): 384 squares
    resized bicubic, scaled to [-1, 1], the model's grid pinpoints, (h, w) as transformers reads them."""
    from manager_jax import pixels

    size = cfg.vision.image_size
    return {
        "image_processor_type": "LlavaOnevisionImageProcessor",
        "do_resize": True,
        "size": {"height": size, "width": size},
        "resample": 3,  # PIL bicubic
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [float(pixels.IMAGE_MEAN)] * 3,
        "image_std": [float(pixels.IMAGE_STD)] * 3,
        "do_pad": True,
        "do_convert_rgb": True,
        "image_grid_pinpoints": _pinpoints_read_as(cfg, "hf"),
    }
