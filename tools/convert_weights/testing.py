"""Random PyTorch checkpoints on disk, in the original LLaVA-NeXT / Manager layout, for tests,
parity checks and benchmarks.

The key names are derived from a transformers LlavaOnevision model by the renaming rules of
SPEC §6.2, written out here independently of `mapping.py` (so a wrong row in the converter's
table cannot be mirrored by the checkpoints it is tested on). Manager tensors and their names come
from the PyTorch reference (`manager_jax.reference.torch_manager`). Files are written with the
official `safetensors` package.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import torch
from safetensors.torch import save_file

from manager_jax.config import ModelConfig

# HF 5.x in-memory name prefix -> original name prefix (SPEC §6.2 table, read right to left).
_HF_TO_ORIGINAL = (
    ("model.vision_tower.", "model.vision_tower.vision_tower.vision_model."),
    ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
    ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
    ("model.language_model.", "model."),
    ("model.image_newline", "model.image_newline"),
    ("lm_head.", "lm_head."),
)


def hf_to_original_key(key: str) -> str:
    """A transformers 5.x LlavaOnevision parameter name -> its original-layout checkpoint key."""
    for src, dst in _HF_TO_ORIGINAL:
        if key.startswith(src):
            return dst + key[len(src):]
    raise KeyError(f"no original-layout name for HF parameter {key!r}")


def manager_settings(cfg: ModelConfig):
    """The PyTorch reference's ManagerSettings for a ModelConfig (None without Manager)."""
    from manager_jax.reference.torch_manager import ManagerSettings

    if not cfg.manager.enabled:
        return None
    return ManagerSettings(
        manager_type=cfg.manager.type,
        grid_type=cfg.manager.grid_type,
        select_layers=cfg.manager.select_layers,
        injection_layers=cfg.injection_layers(),
        convention="original",
        image_aspect_ratio=cfg.image.aspect_ratio,
        merge_type=cfg.image.patch_merge_type,
        image_grid_pinpoints=cfg.image.grid_pinpoints if cfg.image.grid_pinpoints is not None else "(1x1),...,(6x6)",
        im_start_id=min(151644, cfg.text.vocab_size - 1),
    )


def hf_config_for(cfg: ModelConfig):
    """A transformers LlavaOnevisionConfig with the shapes of `cfg` (SigLIP depth = cfg.vision.num_layers)."""
    from transformers import LlavaOnevisionConfig

    from manager_jax.reference.hf_tiny import HF_DEFAULT_PINPOINTS

    t, v = cfg.text, cfg.vision
    if t.hidden_size // t.num_heads != t.head_dim:
        raise ValueError("the HF Qwen2 config derives head_dim = hidden_size // num_heads")
    return LlavaOnevisionConfig(
        vision_config={
            "model_type": "siglip_vision_model", "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_layers,
            "num_attention_heads": v.num_heads, "image_size": v.image_size, "patch_size": v.patch_size,
            "vision_use_head": False, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": v.layer_norm_eps,
        },
        text_config={
            "model_type": "qwen2", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads,
            "max_position_embeddings": t.max_position_embeddings, "rms_norm_eps": t.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
            "tie_word_embeddings": t.tie_word_embeddings, "use_sliding_window": False,
        },
        image_token_index=cfg.image_token_id,
        video_token_index=cfg.image_token_id + 1,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=HF_DEFAULT_PINPOINTS,
        tie_word_embeddings=t.tie_word_embeddings,
        multimodal_projector_bias=True,
    )


def original_config_json(cfg: ModelConfig, *, torch_dtype: str = "float32", declare_vision: bool = True) -> dict:
    """A config.json as the original training code writes it (SPEC §6.1), with real field names.

    `declare_vision=False` leaves out `vision_config`, like the released checkpoints (which only
    name the SigLIP path); readers must then infer the tower from the tensors.
    """
    t = cfg.text
    out = {
        "architectures": ["LlavaQwenManagerForCausalLM" if cfg.manager.enabled else "LlavaQwenForCausalLM"],
        "model_type": "llava_qwen_manager" if cfg.manager.enabled else "llava_qwen",
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": "silu",
        "hidden_size": t.hidden_size,
        "image_aspect_ratio": cfg.image.aspect_ratio,
        "image_crop_resolution": None,
        "image_grid_pinpoints": _pinpoints_list(cfg.image.grid_pinpoints),
        "image_split_resolution": None,
        "initializer_range": 0.02,
        "intermediate_size": t.intermediate_size,
        "max_position_embeddings": t.max_position_embeddings,
        "max_window_layers": t.num_layers,
        "mm_hidden_size": cfg.vision.hidden_size,
        "mm_newline_position": "grid",
        "mm_patch_merge_type": cfg.image.patch_merge_type,
        "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu",
        "mm_resampler_type": None,
        "mm_spatial_pool_mode": "bilinear",
        "mm_tunable_parts": "mm_vision_tower,mm_mlp_adapter,mm_language_model",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": "google/siglip-so400m-patch14-384",
        "mm_vision_tower_lr": 2e-06,
        "num_attention_heads": t.num_heads,
        "num_hidden_layers": t.num_layers,
        "num_key_value_heads": t.num_kv_heads,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": t.rope_theta,
        "sliding_window": None,
        "tie_word_embeddings": t.tie_word_embeddings,
        "tokenizer_model_max_length": 16384,
        "tokenizer_padding_side": "right",
        "torch_dtype": torch_dtype,
        "transformers_version": "4.40.0.dev0",
        "use_cache": True,
        "use_mm_proj": True,
        "use_pos_skipping": False,
        "use_sliding_window": False,
        "vision_tower_pretrained": None,
        "vocab_size": t.vocab_size,
    }
    if cfg.manager.enabled:
        m = cfg.manager
        out.update({
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
            "mm_manager_lr": 5e-05,
            "mm_manager_select_layer_index_list": m.select_layers,
            "mm_manager_index_list": cfg.injection_layers(),
        })
    if declare_vision:
        v = cfg.vision
        out["vision_config"] = {
            "model_type": "siglip_vision_model", "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_layers,
            "num_attention_heads": v.num_heads, "patch_size": v.patch_size, "image_size": v.image_size,
            "layer_norm_eps": v.layer_norm_eps,
        }
    if cfg.image_token_id != 151646:
        out["image_token_index"] = cfg.image_token_id
    return out


def _pinpoints_list(pinpoints):
    if pinpoints is None:
        return None
    if isinstance(pinpoints, str):
        from manager_jax.reference.torch_manager import expand_pinpoints

        return [list(p) for p in expand_pinpoints(pinpoints)]
    return [list(p) for p in pinpoints]


def original_state_dict(hf_model, cfg: ModelConfig, manager_params: Mapping[str, torch.Tensor] | None = None,
                        *, include_tied_lm_head: bool = False) -> dict[str, torch.Tensor]:
    """Original-layout tensors of an HF model (+ Manager tensors) as the original would save them.

    Drops image_newline for flat models and the tied lm_head (SPEC §6.1).
    """
    out = {}
    for name, tensor in hf_model.state_dict().items():
        key = hf_to_original_key(name)
        if key == "model.image_newline" and not cfg.image.has_newline:
            continue
        if key == "lm_head.weight" and cfg.text.tie_word_embeddings and not include_tied_lm_head:
            continue
        out[key] = tensor.detach().clone().contiguous()
    for key, tensor in (manager_params or {}).items():
        out[key] = tensor.detach().clone().contiguous()
    return out


def save_sharded(directory: str, tensors: Mapping[str, torch.Tensor], num_shards: int = 1) -> list[str]:
    """Writes `model.safetensors`, or `num_shards` files + `model.safetensors.index.json` (HF names)."""
    os.makedirs(directory, exist_ok=True)
    keys = list(tensors)
    if num_shards <= 1:
        save_file(dict(tensors), os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    per = math.ceil(len(keys) / num_shards)
    files, weight_map = [], {}
    for k in range(num_shards):
        name = f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors"
        chunk = {key: tensors[key] for key in keys[k * per:(k + 1) * per]}
        save_file(chunk, os.path.join(directory, name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update({key: name for key in chunk})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return files


def write_original_checkpoint(
    directory: str,
    cfg: ModelConfig,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    num_shards: int = 1,
    declare_vision: bool = True,
    include_tied_lm_head: bool = False,
) -> tuple[dict[str, torch.Tensor], object, dict[str, torch.Tensor]]:
    """A random checkpoint of `cfg` in the original layout: safetensors (+ index) and config.json.

    Returns (the tensors written by key, the fp32 HF model they come from, the Manager tensors),
    i.e. what the PyTorch reference needs to run the same model.
    """
    from manager_jax.reference.hf_tiny import tiny_hf_model
    from manager_jax.reference.torch_manager import init_manager_params

    hf_model = tiny_hf_model(hf_config_for(cfg), seed=seed)
    settings = manager_settings(cfg)
    manager = init_manager_params(settings, cfg.text.hidden_size, seed=seed + 7) if settings else {}
    tensors = {k: v.to(dtype) for k, v in original_state_dict(hf_model, cfg, manager,
                                                              include_tied_lm_head=include_tied_lm_head).items()}
    save_sharded(directory, tensors, num_shards)
    config = original_config_json(cfg, torch_dtype=str(dtype).replace("torch.", ""), declare_vision=declare_vision)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return tensors, hf_model, manager
