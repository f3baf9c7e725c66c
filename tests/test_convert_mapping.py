"""The mapping table against the model itself and against transformers' real parameter names."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from manager_jax.config import MANAGER_TYPES, preset, tiny
from manager_jax.models.llava_ov import LlavaOV
from tools.convert_weights import mapping


def _model_shapes(cfg) -> dict:
    model = nnx.eval_shape(lambda: LlavaOV(cfg, rngs=nnx.Rngs(0)))
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {path: tuple(leaf.shape) for path, leaf in mapping.flatten(state).items()}


def _table_shapes(cfg) -> dict:
    return {spec.path: spec.shape for spec in mapping.param_specs(cfg)}


CONFIGS = [
    pytest.param(tiny(v), id=f"tiny-{v}") for v in ("baseline", "manager", "grid", "grid_manager")
] + [
    pytest.param(tiny("grid_manager", manager_type=t), id=f"tiny-{t}") for t in MANAGER_TYPES[1:]
] + [
    pytest.param(tiny("manager", manager_type="adaptive_cross_zerouni").replace(
        manager=tiny("manager", manager_type="adaptive_cross_zerouni").manager.__class__(
            type="adaptive_cross_zerouni", vision_select_layers_start=1, vision_select_layers_end=5,
            injection_start=1, injection_interval=2, injection_end=4)), id="tiny-adaptive-no-layer0"),
    pytest.param(tiny("grid").replace(text=tiny("grid").text.__class__(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
        head_dim=16, tie_word_embeddings=False)), id="tiny-untied"),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_table_matches_model_parameters_exactly(cfg):
    assert _table_shapes(cfg) == _model_shapes(cfg)


@pytest.mark.parametrize("variant", ["baseline", "grid_manager"])
@pytest.mark.parametrize("size", ["0.5b", "7b"])
def test_table_matches_model_at_real_shapes(size, variant):
    cfg = preset(size, variant)
    assert _table_shapes(cfg) == _model_shapes(cfg)


def test_real_05b_shapes_follow_spec_table():
    """A few rows of SPEC §6.1 / §2.2 at the 0.5B shapes (torch layout)."""
    cfg = preset("0.5b", "grid_manager")
    torch_shapes = {t.key: t.torch_shape for t in mapping.all_tensor_specs(cfg)}
    v = "model.vision_tower.vision_tower.vision_model."
    assert torch_shapes["model.embed_tokens.weight"] == (151936, 896)
    assert torch_shapes["model.layers.23.self_attn.k_proj.weight"] == (128, 896)
    assert torch_shapes["model.layers.0.mlp.down_proj.weight"] == (896, 4864)
    assert torch_shapes[v + "embeddings.patch_embedding.weight"] == (1152, 3, 14, 14)
    assert torch_shapes[v + "encoder.layers.25.mlp.fc1.weight"] == (4304, 1152)
    assert v + "encoder.layers.26.mlp.fc1.weight" not in torch_shapes
    assert torch_shapes["model.mm_projector.0.weight"] == (896, 1152)
    assert torch_shapes["model.manager.0.layer_scores"] == (1, 12, 1, 896)
    assert torch_shapes["model.manager.5.layer_scores"] == (1, 13, 1, 896)
    assert torch_shapes["model.manager_layer_embedding"] == (13, 896)
    assert "lm_head.weight" not in torch_shapes  # tied
    assert "model.manager.6.layer_scores" not in torch_shapes
    # SPEC §2.2: 10,752 + 5 * 11,648 + 11,648 = 80,640 Manager parameters, embedding included.
    assert sum(int(np.prod(s)) for k, s in torch_shapes.items() if "manager" in k) == 80_640


def test_hf_parameter_names_map_onto_the_original_table():
    """transformers' own in-memory names, through the hf_memory layout, are exactly the table's keys."""
    from manager_jax.reference.hf_tiny import tiny_hf_config, tiny_hf_model

    hf = tiny_hf_model(tiny_hf_config(vision_layers=4, text_layers=4, tie_word_embeddings=False))
    names = set(hf.state_dict())
    cfg = tiny("grid").replace(text=tiny("grid").text.__class__(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
        head_dim=16, rope_theta=10000.0, tie_word_embeddings=False, max_position_embeddings=16384))
    expected = {mapping.to_layout(t.key, "hf_memory") for t in mapping.all_tensor_specs(cfg)}
    assert names == expected
    assert {mapping.from_layout(n, "hf_memory") for n in names} == {t.key for t in mapping.all_tensor_specs(cfg)}


@pytest.mark.parametrize("layout", list(mapping.LAYOUTS))
def test_layout_renames_invert(layout):
    cfg = tiny("grid_manager", manager_type="adaptive_cross_zerouni")
    parts = {"siglip": ["vision"], "siglip_bare": ["vision"], "qwen2": ["text", "lm_head"]}.get(layout)
    for t in mapping.all_tensor_specs(cfg, parts):
        assert mapping.from_layout(mapping.to_layout(t.key, layout), layout) == t.key


def test_transforms_invert_and_follow_spec_63():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 3)).astype(np.float32)  # torch Linear [out, in]
    assert mapping.to_jax(w, "linear").shape == (3, 5)
    x = rng.standard_normal(3).astype(np.float32)
    np.testing.assert_allclose(x @ mapping.to_jax(w, "linear"), w @ x, rtol=1e-6)  # y = x W^T
    conv = rng.standard_normal((8, 3, 2, 2)).astype(np.float32)  # OIHW
    hwio = mapping.to_jax(conv, "conv")
    assert hwio.shape == (2, 2, 3, 8) and hwio[1, 0, 2, 5] == conv[5, 2, 1, 0]
    scores = rng.standard_normal((1, 4, 1, 6)).astype(np.float32)
    for t, arr in (("linear", w), ("conv", conv), ("squeeze", scores), ("none", x)):
        back = mapping.to_torch(np.ascontiguousarray(mapping.to_jax(arr, t)), t)
        assert back.shape == arr.shape and np.array_equal(back, arr)


def test_summarize_keys_groups_layer_ranges():
    keys = [f"model.layers.{i}.mlp.up_proj.weight" for i in (0, 1, 2, 5)] + ["model.norm.weight"]
    assert mapping.summarize_keys(keys) == ["model.layers.{0..2,5}.mlp.up_proj.weight", "model.norm.weight"]


def test_expected_tree_is_a_pure_dict_with_int_block_keys():
    tree = mapping.expected_tree(tiny("manager"))
    assert set(tree["manager"]["blocks"]) == {0, 1}
    leaves = jax.tree_util.tree_leaves(tree)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
