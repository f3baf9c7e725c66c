"""Model shapes shared by the benchmarks.

``--tiny`` builds the shapes of the PyTorch reference's ``--size tiny`` (ref_torch_llava_ov.py):
2 SigLIP layers and 2 Qwen2 layers of width 64 with the real 152k vocabulary, so that a CPU run of
both scripts compares the same model (the vocabulary dominates at this width).
"""

from __future__ import annotations

import dataclasses

from manager_jax.config import ModelConfig, preset, tiny

REFERENCE_VOCAB = 152000
REFERENCE_IMAGE_TOKEN_ID = 151646


def reference_tiny(variant: str) -> ModelConfig:
    cfg = tiny(variant)
    text = dataclasses.replace(cfg.text, vocab_size=REFERENCE_VOCAB, num_layers=2, max_position_embeddings=32768)
    vision = dataclasses.replace(cfg.vision, num_layers=2)
    manager = cfg.manager
    if manager.enabled:  # the Manager reads vision layers 1..2 and injects into text layer 0
        manager = dataclasses.replace(manager, vision_select_layers_end=3, injection_end=2)
    return cfg.replace(text=text, vision=vision, manager=manager, image_token_id=REFERENCE_IMAGE_TOKEN_ID)


def benchmark_model_config(tiny_shapes: bool, variant: str) -> ModelConfig:
    """The reference's tiny shapes, or the real 0.5B ones."""
    return reference_tiny(variant) if tiny_shapes else preset("0.5b", variant)
