"""Hand-built batches and small models for the training tests (no data pipeline involved).

A shard batch follows docs/CONTRACTS.md §2 and is assembled with `manager_jax.batch.assemble_batch`
from samples whose ids, labels and pixels are random; `step_batch` stacks them to the
[accum, shards, ...] layout of the train step.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from manager_jax import multigrid
from manager_jax.batch import ProcessedSample, assemble_batch
from manager_jax.config import ModelConfig, tiny

IMAGE = -200  # the image sentinel of unexpanded ids
IGNORE = -100


def small_model(variant: str = "manager", **overrides) -> ModelConfig:
    """tiny() with a 2-layer tower and 2-layer decoder (faster on CPU), Manager over both tower layers."""
    cfg = tiny(variant, **overrides)
    cfg.vision.num_layers = 2
    cfg.text.num_layers = 2
    if cfg.manager.enabled:
        cfg.manager = dataclasses.replace(
            cfg.manager, vision_select_layers_start=1, vision_select_layers_end=3, injection_end=2, injection_interval=1
        )
    cfg.validate()
    return cfg


def torch_parity_configs(hf, *, im_start_id: int):
    """(our ModelConfig, the PyTorch reference's ManagerSettings) for a tiny HF LlavaOnevision model
    with an adaptive cross Manager injected before both decoder layers, jitter off (random by
    design), original conventions: the Manager type with the most kinds of parameters (scores,
    gate, controller, fusion Linears with biases)."""
    from manager_jax.config import ImageConfig, ManagerConfig
    from manager_jax.reference.torch_manager import ManagerSettings

    base = ModelConfig.from_hf_config(hf.config.to_dict())
    manager = ManagerConfig(type="adaptive_cross_zerouni", grid_type="all", vision_select_layers_start=1,
                            vision_select_layers_end=3, injection_start=0, injection_interval=1, injection_end=2,
                            jitter_eps=0.0)
    cfg = base.replace(image=ImageConfig(grid_pinpoints=base.image.grid_pinpoints, convention="original"),
                       manager=manager)
    settings = ManagerSettings(
        manager_type=manager.type, grid_type="all", select_layers=manager.select_layers,
        injection_layers=cfg.injection_layers(), convention="original", image_aspect_ratio=cfg.image.aspect_ratio,
        merge_type=cfg.image.patch_merge_type, image_grid_pinpoints=base.image.grid_pinpoints, im_start_id=im_start_id,
    )
    return cfg, settings


def shard_batch(
    cfg: ModelConfig,
    rng: np.random.Generator,
    *,
    rows: int = 1,
    seq_len: int = 832,
    images: int = 1,
    text_samples: int = 1,
    text_len: tuple[int, int] = (8, 20),
    max_crops: int | None = None,
) -> dict[str, np.ndarray]:
    """One packed shard batch: `images` single-image samples and `text_samples` text-only ones."""
    vocab = min(cfg.text.vocab_size, cfg.image_token_id)
    samples = []
    for i in range(images + text_samples):
        has_image = i < images
        prompt = rng.integers(1, vocab, rng.integers(*text_len)).tolist()
        answer = rng.integers(1, vocab, rng.integers(*text_len)).tolist()
        ids = ([IMAGE] if has_image else []) + prompt + answer
        labels = [IGNORE] * (len(ids) - len(answer)) + answer
        plans, pixels = [], np.zeros((0, 384, 384, 3), np.uint8)
        if has_image:
            plan = multigrid.plan_image(
                (384, 384), mode=cfg.image.aspect_ratio, pinpoints=cfg.image.grid_pinpoints,
                convention=cfg.image.convention, unpad=cfg.image.has_newline,
                grid_type=cfg.manager.grid_type if cfg.manager.enabled else None,
            )
            plans = [plan]
            pixels = rng.integers(0, 256, size=(plan.num_crops, 384, 384, 3), dtype=np.uint8)
        samples.append(ProcessedSample(id=f"s{i}", ids=np.asarray(ids), labels=np.asarray(labels), pixels=pixels, plans=plans))
    crops = sum(s.num_crops for s in samples)
    tokens = sum(s.num_image_tokens for s in samples)
    batch = assemble_batch(
        samples, rows=rows, seq_len=seq_len, max_crops=max_crops or max(crops, 1),
        max_image_tokens=max(tokens, 1), pack=True,
        grid_type=cfg.manager.grid_type if cfg.manager.enabled else None, query_type=cfg.manager.query_type,
    )
    return batch.to_model_inputs()


def step_batch(shard_batches: list[list[dict[str, np.ndarray]]]) -> dict[str, np.ndarray]:
    """[accum][shards] shard batches -> {field: [accum, shards, ...]}."""
    fields = shard_batches[0][0].keys()
    return {k: np.stack([np.stack([s[k] for s in micro]) for micro in shard_batches]) for k in fields}


def random_step_batch(cfg: ModelConfig, seed: int, *, accum: int, shards: int, **kw) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return step_batch([[shard_batch(cfg, rng, **kw) for _ in range(shards)] for _ in range(accum)])


def compile_cache_fixture(tmp_path_factory):
    """Body of a module fixture: a persistent compilation cache shared by the training tests.

    Each `train()` / `jit_train_step` call builds a new jitted function, so identical programs are
    compiled again; the on-disk cache turns those recompilations into lookups.
    """
    import jax

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    previous = {k: getattr(jax.config, k) for k in keys}
    directory = tmp_path_factory.getbasetemp() / "train_compile_cache"
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield directory
    for k, v in previous.items():
        jax.config.update(k, v)
