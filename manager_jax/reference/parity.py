"""Builds the same inputs for our model and the PyTorch references, and compares their outputs.

A case is a list of samples; each sample is token ids with one -200 sentinel per image plus the
images. Our side goes through the real preprocessing (`preprocess_image`) and batch assembly
(`assemble_batch`); the PyTorch side gets the HF layout (image token id repeated T times, pixel
values [n_images, max_crops, 3, 384, 384], image sizes as (H, W)). Used by the parity tests and
by `tools.convert_weights verify`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from manager_jax.batch import Batch, ProcessedSample, assemble_batch
from manager_jax.config import ModelConfig
from manager_jax.data.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from manager_jax.data.image_processing import preprocess_image
from manager_jax.pixels import normalize


def random_image(size: tuple[int, int], seed: int) -> Image.Image:
    """A noise image of PIL size (W, H): every pixel matters, so geometry bugs show."""
    w, h = size
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


@dataclass
class SampleSpec:
    ids: list[int]  # with IMAGE_TOKEN_INDEX where an image goes
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # (W, H) per image
    labels: list[int] | None = None


@dataclass
class Case:
    batch: Batch
    hf_inputs: dict  # numpy arrays: input_ids, attention_mask, pixel_values, image_sizes, labels
    batch_num_images: list[int]
    valid: np.ndarray  # bool [B, S] positions to compare


def image_mode(cfg: ModelConfig, n_images: int) -> str:
    """Several images in one sample use pad mode (SPEC §3.2, §7.2)."""
    return "pad" if n_images > 1 else cfg.image.aspect_ratio


def build_case(
    cfg: ModelConfig, samples: list[SampleSpec], *, seed: int = 0, im_start_id: int = 151644,
    seq_len: int | None = None, pack: bool = False,
) -> Case:
    """Our batch (one sample per row, or all packed into one row with `pack=True`) + HF inputs."""
    processed, all_pixels, sizes_hw, per_image_pixels = [], [], [], []
    img_seed = seed
    for i, spec in enumerate(samples):
        ids = np.asarray(spec.ids, np.int32)
        n_img = int((ids == IMAGE_TOKEN_INDEX).sum())
        if n_img != len(spec.image_sizes):
            raise ValueError(f"sample {i}: {n_img} sentinels but {len(spec.image_sizes)} images")
        pixels, plans = [], []
        for size in spec.image_sizes:
            img_seed += 1
            px, plan = preprocess_image(
                random_image(size, img_seed), mode=image_mode(cfg, n_img), pinpoints=cfg.image.grid_pinpoints,
                convention=cfg.image.convention, grid_type=cfg.manager.grid_type if cfg.manager.enabled else None,
                unpad=cfg.image.has_newline,
            )
            pixels.append(px)
            plans.append(plan)
            per_image_pixels.append(px)
            sizes_hw.append((size[1], size[0]))
        labels = np.asarray(spec.labels if spec.labels is not None else np.where(ids < 0, IGNORE_INDEX, ids), np.int32)
        px = np.concatenate(pixels) if pixels else np.zeros((0, 384, 384, 3), np.uint8)
        processed.append(ProcessedSample(f"s{i}", ids, labels, px, plans))
        all_pixels.append(px)
    lengths = [len(s.ids) - s.num_images + sum(p.num_tokens for p in s.plans) for s in processed]
    s_len = seq_len or (sum(lengths) if pack else max(lengths))
    crops = max(1, sum(s.num_crops for s in processed))
    tokens = max(1, sum(p.num_tokens for s in processed for p in s.plans))
    batch = assemble_batch(
        processed, rows=1 if pack else len(samples), seq_len=s_len, max_crops=crops, max_image_tokens=tokens, pack=pack,
        grid_type=cfg.manager.grid_type if cfg.manager.enabled else None, query_type=cfg.manager.query_type,
        pad_id=0, im_start_id=im_start_id,
    )
    ids = batch.input_ids.copy()
    flat = ids.reshape(-1)
    real = batch.plan_dst[batch.plan_dst < flat.size]
    flat[real] = cfg.image_token_id
    hf = {"input_ids": ids, "attention_mask": (batch.segment_ids != 0).astype(np.int64), "labels": batch.labels}
    if per_image_pixels:
        max_c = max(p.shape[0] for p in per_image_pixels)
        pv = np.zeros((len(per_image_pixels), max_c, 3, 384, 384), np.float32)
        for i, p in enumerate(per_image_pixels):
            pv[i, : p.shape[0]] = normalize(p).transpose(0, 3, 1, 2)
        hf["pixel_values"] = pv
        hf["image_sizes"] = np.asarray(sizes_hw, np.int64)
    return Case(batch, hf, [s.num_images for s in processed], batch.segment_ids != 0)


def relative_error(ours: np.ndarray, ref: np.ndarray, valid: np.ndarray | None = None) -> float:
    """||ours - ref|| / ||ref|| over the valid positions."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if valid is not None:
        ours, ref = ours[valid], ref[valid]
    return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30))


def tree_from_torch_state(cfg: ModelConfig, state: dict, layout: str) -> dict:
    """Our nested parameter tree from an in-memory PyTorch state dict (numpy values).

    Drives the converter's mapping table (`tools.convert_weights.mapping`) in memory; keys may be in
    any of its layouts (e.g. "hf_memory" for `model.state_dict()` of transformers 5.x), Manager
    tensors under their original names.
    """
    from tools.convert_weights import mapping

    original = {mapping.from_layout(k, layout): np.asarray(v) for k, v in state.items()}
    tree: dict = {}
    for spec in mapping.param_specs(cfg):
        arrays = [mapping.to_jax(original[t.key], spec.transform) for t in mapping.tensor_specs(spec)]
        mapping.set_path(tree, spec.path, np.stack(arrays) if spec.stack else arrays[0])
    return tree


def jax_model_from_torch(cfg: ModelConfig, hf_model, manager_params: dict | None = None):
    """Our LlavaOV with the weights of an HF LlavaOnevision model (+ original-named Manager tensors)."""
    import jax.numpy as jnp
    from flax import nnx

    from manager_jax.models.llava_ov import LlavaOV

    state = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    state.update({k: v.detach().float().numpy() for k, v in (manager_params or {}).items()})
    tree = tree_from_torch_state(cfg, state, "hf_memory")
    model = LlavaOV(cfg, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(params, _to_jnp(tree, jnp))
    nnx.update(model, params)
    return model


def _to_jnp(tree, jnp):
    return {k: _to_jnp(v, jnp) if isinstance(v, dict) else jnp.asarray(v) for k, v in tree.items()}
