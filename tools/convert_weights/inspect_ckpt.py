"""`inspect PATH`: the detected format, the model config and every tensor (name, shape, dtype).

Works on anything the converter reads (original / HF / bare SigLIP or Qwen2 safetensors
checkpoints, single files, params directories, training checkpoints) without loading tensor data,
and reports a damaged input instead of raising (the command then exits with status 1).
"""

from __future__ import annotations

import json
import os

from manager_jax import params_io
from manager_jax.config import ModelConfig
from tools.convert_weights import mapping
from tools.convert_weights.safetensors_io import SafetensorsCheckpoint, SafetensorsError, describe
from tools.convert_weights.sources import ConversionError, _config_kind, _hf_layout, open_torch_source


def _config_summary(cfg: ModelConfig) -> list[str]:
    t, v, m = cfg.text, cfg.vision, cfg.manager
    lines = [
        f"text:    Qwen2 {t.num_layers} layers, hidden {t.hidden_size}, heads {t.num_heads}/{t.num_kv_heads} "
        f"(head_dim {t.head_dim}), mlp {t.intermediate_size}, vocab {t.vocab_size}, "
        f"tied lm_head {t.tie_word_embeddings}",
        f"vision:  SigLIP {v.num_layers} layers, hidden {v.hidden_size}, heads {v.num_heads}, mlp "
        f"{v.intermediate_size}, patch {v.patch_size}, image {v.image_size}",
        f"image:   {cfg.image.aspect_ratio} / {cfg.image.patch_merge_type} (convention {cfg.image.convention})",
    ]
    if m.enabled:
        lines.append(f"manager: {m.type}, grid {m.grid_type}, select {m.select_layers}, injection "
                     f"{cfg.injection_layers()}")
    else:
        lines.append("manager: none")
    return lines


def inspect(path: str) -> str:
    """A human-readable report of `path`."""
    return inspect_report(path)[0]


def inspect_report(path: str) -> tuple[str, bool]:
    """(report, whether `path` could be read as a checkpoint)."""
    out: list[str] = []
    if "," in path:
        try:
            src = open_torch_source(path, "siglip+qwen2")
        except ConversionError as e:
            return f"format: siglip+qwen2 (invalid)\n{e}", False
        out += ["format: siglip+qwen2", *_config_summary(src.config)]
        for ckpt in src.checkpoints:
            out += [f"\n{ckpt.path}: {len(ckpt.keys())} tensors, {ckpt.total_bytes() / 1e9:.3f} GB",
                    describe((k, ckpt.info(k).shape, ckpt.info(k).dtype) for k in sorted(ckpt.keys()))]
        return "\n".join(out), True
    if not os.path.exists(path):
        return f"{path}: does not exist", False
    if os.path.isdir(path) and params_io.is_params_dir(path):
        try:
            item, cfg_path = params_io.resolve_params_dir(path)
            out.append("format: orbax" + (" (training checkpoint, latest step " + os.path.basename(os.path.dirname(item))
                                          + ")" if os.path.abspath(os.path.dirname(item)) != os.path.abspath(path) else ""))
            if cfg_path:
                out += _config_summary(params_io.read_config(cfg_path))
            meta = params_io.tree_metadata(item)
        except params_io.ParamsError as e:
            return "\n".join(out + [f"unreadable: {e}"]), False
        flat = sorted(mapping.flatten(meta).items(), key=lambda kv: str(kv[0]))
        total = sum(mapping.count_bytes(leaf.shape, leaf.dtype) for _, leaf in flat)
        out.append(f"{len(flat)} arrays, {total / 1e9:.3f} GB")
        out.append(describe((".".join(str(p) for p in k), leaf.shape, str(leaf.dtype)) for k, leaf in flat))
        return "\n".join(out), True
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    cfg_path = os.path.join(directory, "config.json")
    raw = None
    if os.path.exists(cfg_path):
        try:
            with open(cfg_path) as f:
                raw = json.load(f)
        except json.JSONDecodeError as e:
            out.append(f"config.json: not valid JSON ({e})")
    kind = _config_kind(raw) if raw else None
    try:
        ckpt = SafetensorsCheckpoint(path)
    except (SafetensorsError, OSError) as e:
        return "\n".join(out + [f"format: {kind or 'unknown'} (unreadable)", str(e)]), False
    layout = {"hf": _hf_layout(ckpt.keys()), "llava": "llava"}.get(kind or "", None)
    out.append(f"format: {kind or 'safetensors (no config.json)'}" + (f" ({layout} names)" if layout else ""))
    if kind in ("llava", "hf"):
        try:
            out += _config_summary(open_torch_source(path, kind).config)
        except ConversionError as e:
            out.append(f"not convertible as is:\n{e}")
    out.append(f"{len(ckpt.keys())} tensors in {len(ckpt.files)} file(s), {ckpt.total_bytes() / 1e9:.3f} GB")
    out.append(describe((k, ckpt.info(k).shape, ckpt.info(k).dtype) for k in sorted(ckpt.keys())))
    return "\n".join(out), True
