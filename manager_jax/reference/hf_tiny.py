"""Tiny random HF transformers LlavaOnevision models, built offline for parity tests.

Choices (documented because parity tests depend on them):
- Image size 384 and patch 14 are fixed: 27 x 27 = 729 tokens per crop is baked into the anyres
  algorithm and into the Manager (SPEC §2.6 asserts 729 tokens per image on the multi-image path).
- The vocabulary is small (512 rows by default) and the image token is a small id inside it
  (`image_token_id=500`, `video_token_id=501`) instead of the real 151646, so the embedding and
  lm_head stay tiny. This matches `manager_jax.config.tiny` (image_token_id 500). Tests that need
  `<|im_start|>` use a small id too (see `ManagerSettings.im_start_id`).
- Weights are random and in fp32. Every LayerNorm/RMSNorm weight, every bias and `image_newline`
  are re-drawn to non-trivial values (HF initialises norms to 1 and biases to 0), so a parity test
  fails if two such tensors are swapped or dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

# HF's default LlavaOnevision pinpoints: 36 pairs of multiples of 384 up to 6x6 read as (height, width).
HF_DEFAULT_PINPOINTS = [[i * 384, j * 384] for i in range(1, 7) for j in range(1, 7)]


def tiny_hf_config(
    *,
    vision_layers: int = 4,
    text_layers: int = 4,
    hidden: int = 64,
    vision_hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 512,
    image_token_id: int = 500,
    video_token_id: int = 501,
    image_grid_pinpoints: Sequence[Sequence[int]] | None = None,
    vision_aspect_ratio: str = "anyres_max_9",
    tie_word_embeddings: bool = True,
    image_size: int = 384,
    patch_size: int = 14,
    intermediate: int = 128,
    vision_intermediate: int = 128,
    rope_theta: float = 10000.0,
    max_position_embeddings: int = 16384,
) -> LlavaOnevisionConfig:
    """A small `LlavaOnevisionConfig` (SigLIP + Qwen2) with the real geometry.

    `image_grid_pinpoints` are HF-ordered (height, width) pairs; None gives HF's 36 default pairs.
    """
    if (image_size, patch_size) != (384, 14):
        raise ValueError(
            f"image_size/patch_size must be 384/14 (729 tokens per crop), got {image_size}/{patch_size}"
        )
    for name, token in (("image_token_id", image_token_id), ("video_token_id", video_token_id)):
        if not 0 <= token < vocab:
            raise ValueError(f"{name}={token} must lie inside the vocabulary of size {vocab}")
    if hidden % heads or heads % kv_heads or vision_hidden % heads:
        raise ValueError(f"hidden={hidden}/vision_hidden={vision_hidden} must divide into heads={heads}, "
                         f"and heads into kv_heads={kv_heads}")
    vision_config = {
        "model_type": "siglip_vision_model",
        "hidden_size": vision_hidden,
        "intermediate_size": vision_intermediate,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": heads,
        "image_size": image_size,
        "patch_size": patch_size,
        "vision_use_head": False,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
    }
    text_config = {
        "model_type": "qwen2",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": text_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "tie_word_embeddings": tie_word_embeddings,
        "use_sliding_window": False,
    }
    pinpoints = [list(p) for p in image_grid_pinpoints] if image_grid_pinpoints is not None else HF_DEFAULT_PINPOINTS
    return LlavaOnevisionConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_id,
        video_token_index=video_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio=vision_aspect_ratio,
        image_grid_pinpoints=pinpoints,
        tie_word_embeddings=tie_word_embeddings,
        multimodal_projector_bias=True,
    )


def tiny_hf_model(
    config: LlavaOnevisionConfig, seed: int = 0, attn_implementation: str = "eager"
) -> LlavaOnevisionForConditionalGeneration:
    """A randomly initialised fp32 model in eval mode.

    Besides HF's own init, all biases, norm weights and `image_newline` get fresh random values
    (norm weights around 1, biases around 0, both clearly non-trivial). `attn_implementation`
    defaults to "eager"; long-sequence tests may pass "sdpa" to save memory.
    """
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration._from_config(
        config, attn_implementation=attn_implementation, dtype=torch.float32
    )
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            is_norm = "norm" in name and leaf == "weight"
            if name.endswith("image_newline"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
            elif is_norm:
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=gen))
            elif leaf == "bias":
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    model.eval()
    return model
