"""THE mapping between PyTorch checkpoint keys and our parameter tree, used in both directions.

One row of `RULES` ties a parameter path of our tree (docs/CONTRACTS.md §3) to a PyTorch key in the
original LLaVA-NeXT / Manager layout (SPEC §6.1), with its PyTorch shape written in symbols of the
model config, the layout change (SPEC §6.3) and whether it is stacked over a tower's layers (the
scan layout). Other on-disk layouts (transformers llava-onevision, bare SigLIP / Qwen2 checkpoints)
are prefix renames of the original keys (`LAYOUTS`), so every direction and format reads the
same table.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from manager_jax.config import ModelConfig

# ---- the table ----------------------------------------------------------------------------------

_V = "model.vision_tower.vision_tower.vision_model."  # the original SigLIP prefix (SPEC §6.1)


@dataclass(frozen=True)
class Rule:
    """One parameter.

    path:      dotted path in our tree; "{j}" is the Manager block index.
    key:       PyTorch key in the original layout; "{i}" is the layer index, "{j}" the block.
    shape:     PyTorch shape; strings are dimensions from `dimensions()`.
    transform: "none", "linear" ([out, in] -> [in, out]), "conv" (OIHW -> HWIO) or
               "squeeze" ([1, N, 1, D] -> [N, D]).
    stack:     None, "vision" or "text": the torch tensors of every layer stack on a leading axis.
    when:      which models have it: "always", "newline", "untied", "manager", or per Manager block
               "static_block", "adaptive_block", "cross_block".
    """

    path: str
    key: str
    shape: tuple
    transform: str = "none"
    stack: str | None = None
    when: str = "always"


def _vision_layer(path: str, key: str, shape: tuple, transform: str = "none") -> Rule:
    return Rule("vision.layers." + path, _V + "encoder.layers.{i}." + key, shape, transform, "vision")


def _text_layer(path: str, key: str, shape: tuple, transform: str = "none") -> Rule:
    return Rule("text.layers." + path, "model.layers.{i}." + key, shape, transform, "text")


RULES: tuple[Rule, ...] = (
    # SigLIP vision tower (26 layers; head absent).
    Rule("vision.patch_embed.kernel", _V + "embeddings.patch_embedding.weight", ("DV", 3, "P", "P"), "conv"),
    Rule("vision.patch_embed.bias", _V + "embeddings.patch_embedding.bias", ("DV",)),
    Rule("vision.pos_embed", _V + "embeddings.position_embedding.weight", ("NP", "DV")),
    _vision_layer("ln1.scale", "layer_norm1.weight", ("DV",)),
    _vision_layer("ln1.bias", "layer_norm1.bias", ("DV",)),
    _vision_layer("ln2.scale", "layer_norm2.weight", ("DV",)),
    _vision_layer("ln2.bias", "layer_norm2.bias", ("DV",)),
    _vision_layer("attn.q.kernel", "self_attn.q_proj.weight", ("DV", "DV"), "linear"),
    _vision_layer("attn.q.bias", "self_attn.q_proj.bias", ("DV",)),
    _vision_layer("attn.k.kernel", "self_attn.k_proj.weight", ("DV", "DV"), "linear"),
    _vision_layer("attn.k.bias", "self_attn.k_proj.bias", ("DV",)),
    _vision_layer("attn.v.kernel", "self_attn.v_proj.weight", ("DV", "DV"), "linear"),
    _vision_layer("attn.v.bias", "self_attn.v_proj.bias", ("DV",)),
    _vision_layer("attn.o.kernel", "self_attn.out_proj.weight", ("DV", "DV"), "linear"),
    _vision_layer("attn.o.bias", "self_attn.out_proj.bias", ("DV",)),
    _vision_layer("mlp.fc1.kernel", "mlp.fc1.weight", ("IV", "DV"), "linear"),
    _vision_layer("mlp.fc1.bias", "mlp.fc1.bias", ("IV",)),
    _vision_layer("mlp.fc2.kernel", "mlp.fc2.weight", ("DV", "IV"), "linear"),
    _vision_layer("mlp.fc2.bias", "mlp.fc2.bias", ("DV",)),
    Rule("vision.post_ln.scale", _V + "post_layernorm.weight", ("DV",)),
    Rule("vision.post_ln.bias", _V + "post_layernorm.bias", ("DV",)),
    # Projector mlp2x_gelu (index 1 is the parameter-free GELU).
    Rule("projector.linear1.kernel", "model.mm_projector.0.weight", ("D", "DV"), "linear"),
    Rule("projector.linear1.bias", "model.mm_projector.0.bias", ("D",)),
    Rule("projector.linear2.kernel", "model.mm_projector.2.weight", ("D", "D"), "linear"),
    Rule("projector.linear2.bias", "model.mm_projector.2.bias", ("D",)),
    Rule("image_newline", "model.image_newline", ("D",), when="newline"),
    # Qwen2 decoder.
    Rule("text.embed.embedding", "model.embed_tokens.weight", ("V", "D")),
    _text_layer("input_norm.scale", "input_layernorm.weight", ("D",)),
    _text_layer("post_attn_norm.scale", "post_attention_layernorm.weight", ("D",)),
    _text_layer("attn.q.kernel", "self_attn.q_proj.weight", ("HQ", "D"), "linear"),
    _text_layer("attn.q.bias", "self_attn.q_proj.bias", ("HQ",)),
    _text_layer("attn.k.kernel", "self_attn.k_proj.weight", ("HKV", "D"), "linear"),
    _text_layer("attn.k.bias", "self_attn.k_proj.bias", ("HKV",)),
    _text_layer("attn.v.kernel", "self_attn.v_proj.weight", ("HKV", "D"), "linear"),
    _text_layer("attn.v.bias", "self_attn.v_proj.bias", ("HKV",)),
    _text_layer("attn.o.kernel", "self_attn.o_proj.weight", ("D", "HQ"), "linear"),
    _text_layer("mlp.gate.kernel", "mlp.gate_proj.weight", ("I", "D"), "linear"),
    _text_layer("mlp.up.kernel", "mlp.up_proj.weight", ("I", "D"), "linear"),
    _text_layer("mlp.down.kernel", "mlp.down_proj.weight", ("D", "I"), "linear"),
    Rule("text.norm.scale", "model.norm.weight", ("D",)),
    Rule("lm_head.kernel", "lm_head.weight", ("V", "D"), "linear", when="untied"),
    # Manager (SPEC §2.2).
    Rule("manager.layer_embedding", "model.manager_layer_embedding", ("N", "D"), when="manager"),
    Rule("manager.blocks.{j}.layer_scores", "model.manager.{j}.layer_scores", (1, "NJ", 1, "D"), "squeeze",
         when="static_block"),
    Rule("manager.blocks.{j}.controller.kernel", "model.manager.{j}.linear_controller.weight", ("NJ", "CIN"),
         "linear", when="adaptive_block"),
    Rule("manager.blocks.{j}.zero_gate", "model.manager.{j}.zero_gate", (1, "NJ", 1, "D"), "squeeze",
         when="adaptive_block"),
    Rule("manager.blocks.{j}.fusion_q.kernel", "model.manager.{j}.fusion_attention.q_proj.weight", ("D", "D"),
         "linear", when="cross_block"),
    Rule("manager.blocks.{j}.fusion_q.bias", "model.manager.{j}.fusion_attention.q_proj.bias", ("D",),
         when="cross_block"),
    Rule("manager.blocks.{j}.fusion_k.kernel", "model.manager.{j}.fusion_attention.k_proj.weight", ("D", "D"),
         "linear", when="cross_block"),
    Rule("manager.blocks.{j}.fusion_k.bias", "model.manager.{j}.fusion_attention.k_proj.bias", ("D",),
         when="cross_block"),
)

# ---- on-disk layouts: ordered (original prefix, layout prefix) renames; first match wins --------

_HF_COMMON = (
    ("model.mm_projector.0.", "multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
    ("model.image_newline", "image_newline"),
    ("model.manager", "model.manager"),  # no HF counterpart: kept verbatim (SPEC §6.2)
    ("model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)
LAYOUTS: dict[str, tuple[tuple[str, str], ...]] = {
    # Original LLaVA-NeXT / Manager (SPEC §6.1).
    "llava": (),
    # transformers 5.x save_pretrained (SPEC §6.2, checked with 5.24).
    "hf": ((_V, "vision_tower."),) + _HF_COMMON,
    # Hub checkpoints written by transformers 4.4x.
    "hf_legacy": ((_V, "vision_tower.vision_model."),) + _HF_COMMON,
    # transformers 5.x in-memory state_dict names (a raw `torch.save(model.state_dict())` style dump).
    "hf_memory": (
        (_V, "model.vision_tower."),
        ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
        ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
        ("model.image_newline", "model.image_newline"),
        ("model.manager", "model.manager"),
        ("model.", "model.language_model."),
        ("lm_head.", "lm_head."),
    ),
    # A SigLIP checkpoint: SiglipModel / hub SiglipVisionModel, or a 5.x SiglipVisionModel (no prefix).
    "siglip": ((_V, "vision_model."),),
    "siglip_bare": ((_V, ""),),
    # A Qwen2ForCausalLM checkpoint uses the original text names.
    "qwen2": (),
}


def to_layout(key: str, layout: str) -> str:
    """Original-layout key -> key in `layout`."""
    for src, dst in LAYOUTS[layout]:
        if key.startswith(src):
            return dst + key[len(src):]
    return key


def from_layout(key: str, layout: str) -> str | None:
    """Key in `layout` -> original-layout key (None when no rename applies and the layout renames all)."""
    for src, dst in LAYOUTS[layout]:
        if dst and key.startswith(dst):
            return src + key[len(dst):]
    for src, dst in LAYOUTS[layout]:
        if not dst:  # a prefix-free layout (siglip_bare) claims every remaining key
            return src + key
    return key


# ---- config -> concrete specs ---------------------------------------------------------------------


def dimensions(cfg: ModelConfig) -> dict[str, int]:
    """Values of the symbols used in `RULES` shapes."""
    t, v = cfg.text, cfg.vision
    return {
        "D": t.hidden_size,
        "I": t.intermediate_size,
        "V": t.vocab_size,
        "HQ": t.num_heads * t.head_dim,
        "HKV": t.num_kv_heads * t.head_dim,
        "DV": v.hidden_size,
        "IV": v.intermediate_size,
        "P": v.patch_size,
        "NP": v.num_patches,
        "N": cfg.num_manager_layers,
    }


def manager_blocks(cfg: ModelConfig) -> list[dict]:
    """Per injection block: kind ("static" / "adaptive"), number of scores NJ and controller width CIN."""
    if not cfg.manager.enabled:
        return []
    n, d, qtype = cfg.num_manager_layers, cfg.text.hidden_size, cfg.manager.query_type
    blocks = []
    for layer in cfg.injection_layers():
        if layer == 0:  # the layer-0 manager is static and drops the last selected layer (SPEC §2.2)
            blocks.append({"kind": "static", "NJ": n - 1, "CIN": d, "cross": False})
        elif qtype is None:
            blocks.append({"kind": "static", "NJ": n, "CIN": d, "cross": False})
        else:
            blocks.append({"kind": "adaptive", "NJ": n, "CIN": d if qtype == "none" else 2 * d,
                           "cross": qtype == "cross"})
    return blocks


def _active(rule: Rule, cfg: ModelConfig, block: dict | None) -> bool:
    when = rule.when
    if when == "always":
        return True
    if when == "newline":
        return cfg.image.has_newline
    if when == "untied":
        return not cfg.text.tie_word_embeddings
    if when == "manager":
        return cfg.manager.enabled
    if block is None:
        raise ValueError(f"rule {rule.path} needs a manager block")
    if when == "static_block":
        return block["kind"] == "static"
    if when == "adaptive_block":
        return block["kind"] == "adaptive"
    if when == "cross_block":
        return block["cross"]
    raise ValueError(f"unknown condition {when!r} in rule {rule.path}")


def jax_shape(torch_shape: Sequence[int], transform: str) -> tuple[int, ...]:
    s = tuple(torch_shape)
    if transform == "none":
        return s
    if transform == "linear":
        return (s[1], s[0])
    if transform == "conv":
        return (s[2], s[3], s[1], s[0])
    if transform == "squeeze":
        return (s[1], s[3])
    raise ValueError(f"unknown transform {transform!r}")


def to_jax(x: np.ndarray, transform: str) -> np.ndarray:
    """PyTorch tensor -> our layout (a view where possible)."""
    if transform == "none":
        return x
    if transform == "linear":
        return x.T
    if transform == "conv":
        return x.transpose(2, 3, 1, 0)
    if transform == "squeeze":
        return x.reshape(x.shape[1], x.shape[3])
    raise ValueError(f"unknown transform {transform!r}")


def to_torch(x: np.ndarray, transform: str) -> np.ndarray:
    """Our layout -> PyTorch tensor (a view where possible); inverse of `to_jax`."""
    if transform == "none":
        return x
    if transform == "linear":
        return x.T
    if transform == "conv":
        return x.transpose(3, 2, 0, 1)
    if transform == "squeeze":
        return x.reshape(1, x.shape[0], 1, x.shape[1])
    raise ValueError(f"unknown transform {transform!r}")


@dataclass(frozen=True)
class TensorSpec:
    """One PyTorch tensor of a concrete model: its original key, shape, and where it goes."""

    key: str  # original-layout key
    torch_shape: tuple[int, ...]
    param: "ParamSpec"
    layer: int | None  # index on the stacked axis, None when not stacked


@dataclass(frozen=True)
class ParamSpec:
    """One leaf of our tree for a concrete model."""

    path: tuple  # e.g. ("manager", "blocks", 0, "layer_scores"); block indices are ints (nnx.List)
    shape: tuple[int, ...]  # full shape, with the leading layer axis when stacked
    transform: str
    stack: str | None
    rule: Rule

    @property
    def dotted(self) -> str:
        return ".".join(str(p) for p in self.path)


def _resolve(shape: tuple, dims: dict[str, int]) -> tuple[int, ...]:
    return tuple(dims[s] if isinstance(s, str) else int(s) for s in shape)


def _path(template: str, j: int | None) -> tuple:
    parts = template.replace("{j}", str(j)).split(".") if j is not None else template.split(".")
    return tuple(int(p) if p.isdigit() else p for p in parts)


def param_specs(cfg: ModelConfig, parts: Iterable[str] | None = None) -> list[ParamSpec]:
    """Every leaf of the parameter tree of `cfg`, with the torch tensors that make it up.

    `parts` restricts to top-level subtrees (e.g. {"vision"} for a SigLIP checkpoint).
    """
    dims = dimensions(cfg)
    n_layers = {"vision": cfg.vision.num_layers, "text": cfg.text.num_layers}
    wanted = set(parts) if parts is not None else None
    specs = []
    for rule in RULES:
        top = rule.path.split(".")[0]
        if wanted is not None and top not in wanted:
            continue
        blocks = list(enumerate(manager_blocks(cfg))) if "{j}" in rule.path else [(None, None)]
        for j, block in blocks:
            if not _active(rule, cfg, block):
                continue
            local = dict(dims, **({"NJ": block["NJ"], "CIN": block["CIN"]} if block else {}))
            tshape = _resolve(rule.shape, local)
            jshape = jax_shape(tshape, rule.transform)
            if rule.stack:
                jshape = (n_layers[rule.stack],) + jshape
            specs.append(ParamSpec(_path(rule.path, j), jshape, rule.transform, rule.stack, rule))
    return specs


def tensor_specs(spec: ParamSpec) -> list[TensorSpec]:
    """The torch tensors of one parameter, in layer order."""
    rule = spec.rule
    j = next((p for p in spec.path if isinstance(p, int)), None)
    key = rule.key.replace("{j}", str(j)) if j is not None else rule.key
    torch_shape = _torch_shape(spec)
    if not spec.stack:
        return [TensorSpec(key, torch_shape, spec, None)]
    return [TensorSpec(key.replace("{i}", str(i)), torch_shape, spec, i) for i in range(spec.shape[0])]


def _torch_shape(spec: ParamSpec) -> tuple[int, ...]:
    s = spec.shape[1:] if spec.stack else spec.shape
    t = spec.transform
    if t == "none":
        return tuple(s)
    if t == "linear":
        return (s[1], s[0])
    if t == "conv":
        return (s[3], s[2], s[0], s[1])
    if t == "squeeze":
        return (1, s[0], 1, s[1])
    raise ValueError(t)


def all_tensor_specs(cfg: ModelConfig, parts: Iterable[str] | None = None) -> list[TensorSpec]:
    return [t for p in param_specs(cfg, parts) for t in tensor_specs(p)]


def expected_tree(cfg: ModelConfig, dtype=None) -> dict:
    """Nested dict of `numpy` shape/dtype placeholders (`jax.ShapeDtypeStruct`-like) for `cfg`."""
    import jax

    tree: dict = {}
    for spec in param_specs(cfg):
        set_path(tree, spec.path, jax.ShapeDtypeStruct(spec.shape, np.dtype(dtype or cfg.param_dtype)))
    return tree


# ---- tree helpers -------------------------------------------------------------------------------


def set_path(tree: dict, path: Sequence, value) -> None:
    node = tree
    for p in path[:-1]:
        node = node.setdefault(p, {})
    node[path[-1]] = value


def get_path(tree: dict, path: Sequence):
    node = tree
    for p in path:
        node = node[p]
    return node


def flatten(tree: dict) -> dict[tuple, object]:
    """Nested dict -> {path tuple: leaf}."""
    from manager_jax.params_io import flatten_tree

    return flatten_tree(tree)


# ---- readable key listings ----------------------------------------------------------------------

_INDEX = re.compile(r"\.(layers|manager|blocks)\.(\d+)\.")


def summarize_keys(keys: Iterable[str], limit: int = 25) -> list[str]:
    """Groups keys that differ only in a layer / block index: "model.layers.{0..3}.mlp.up_proj.weight"."""
    groups: dict[str, list[int]] = {}
    singles = []
    for key in sorted(keys):
        m = _INDEX.search(key)
        if m:
            template = key[: m.start()] + f".{m.group(1)}.{{}}." + key[m.end():]
            groups.setdefault(template, []).append(int(m.group(2)))
        else:
            singles.append(key)
    lines = list(singles)
    for template, idx in groups.items():
        lines.append(template.replace("{}", "{" + _ranges(sorted(set(idx))) + "}"))
    lines.sort()
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
    return lines


def _ranges(values: list[int]) -> str:
    out, start = [], None
    for k, v in enumerate(values):
        if start is None:
            start = v
        if k + 1 == len(values) or values[k + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}..{v}")
            start = None
    return ",".join(out)


def count_bytes(shape: Sequence[int], dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize
