"""Model config: constructors from the original and HF config.json, presets, validation."""

import json

import pytest

from manager_jax import config as C


def _original_config(manager: bool, grid: bool) -> dict:
    """A config.json as the original training writes it (SPEC §6.1), 0.5B."""
    cfg = {
        "architectures": ["LlavaQwenManagerForCausalLM" if manager else "LlavaQwenForCausalLM"],
        "model_type": "llava_qwen_manager" if manager else "llava_qwen",
        "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
        "num_key_value_heads": 2, "vocab_size": 151936, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06,
        "tie_word_embeddings": True, "max_position_embeddings": 32768,
        "mm_hidden_size": 1152, "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
        "mm_vision_tower": "/some/local/siglip-so400m-patch14-384",
        "mm_patch_merge_type": "spatial_unpad" if grid else "flat",
        "image_aspect_ratio": "anyres_max_9" if grid else "square",
        "image_grid_pinpoints": [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)] if grid else None,
        "tokenizer_model_max_length": 16384,
    }
    if manager:
        cfg.update({
            "mm_manager_type": "static_zerouni", "mm_manager_grid_type": "all",
            "mm_manager_vision_select_layers_start": 13, "mm_manager_vision_select_layers_interval": 1,
            "mm_manager_vision_select_layers_end": 26, "mm_manager_injection_start": 0,
            "mm_manager_injection_interval": 4, "mm_manager_injection_end": 24, "mm_manager_residual": True,
            "mm_manager_softmax_temperature": 1.0,
            "mm_manager_select_layer_index_list": list(range(13, 26)),
            "mm_manager_index_list": [0, 4, 8, 12, 16, 20],
        })
    return cfg


@pytest.mark.parametrize("manager", [False, True])
@pytest.mark.parametrize("grid", [False, True])
def test_from_original_config_four_variants(manager, grid):
    cfg = C.ModelConfig.from_original_config(_original_config(manager, grid))
    expected = C.preset("0.5b", ("grid" if grid else "baseline") if not manager else ("grid_manager" if grid else "manager"))
    assert cfg.text == expected.text
    assert cfg.vision == expected.vision
    assert cfg.manager.enabled == manager
    if manager:
        assert cfg.injection_layers() == [0, 4, 8, 12, 16, 20]
        assert cfg.manager.select_layers == list(range(13, 26))
    assert cfg.image.has_newline == grid
    assert cfg.image.aspect_ratio == ("anyres_max_9" if grid else "square")
    if grid:
        assert len(cfg.image.grid_pinpoints) == 36 and cfg.image.grid_pinpoints[1] == (384, 768)


def test_original_config_inconsistent_index_list_is_rejected():
    raw = _original_config(True, True)
    raw["mm_manager_select_layer_index_list"] = list(range(12, 26))
    with pytest.raises(C.ConfigError, match="disagrees"):
        C.ModelConfig.from_original_config(raw)


def test_from_hf_config_and_json_round_trip(tmp_path):
    from manager_jax.reference.hf_tiny import tiny_hf_config

    hf = tiny_hf_config(vision_layers=2, text_layers=3, image_grid_pinpoints=[[384, 768], [768, 384]])
    cfg = C.ModelConfig.from_hf_config(hf.to_dict())
    assert cfg.image.convention == "hf"
    assert cfg.image.grid_pinpoints == [(384, 768), (768, 384)]  # HF pairs kept in HF's (h, w) reading
    assert cfg.text.num_layers == 3 and cfg.vision.num_layers == 2 and cfg.image_token_id == 500
    path = tmp_path / "config.json"
    cfg.save(str(path))
    assert C.ModelConfig.from_json_file(str(path)) == cfg
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf.to_dict()))
    assert C.ModelConfig.from_json_file(str(tmp_path / "hf")) == cfg


@pytest.mark.parametrize("pinpoints", [[[384, 768], [768, 384]], [[768, 384], [384, 768]]])
def test_hf_config_pinpoints_pick_transformers_canvas(pinpoints):
    # A square image ties between a pair and its transpose: transformers keeps the first (h, w).
    from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape

    from manager_jax import multigrid
    from manager_jax.reference.hf_tiny import tiny_hf_config

    cfg = C.ModelConfig.from_hf_config(tiny_hf_config(vision_layers=2, text_layers=2,
                                                      image_grid_pinpoints=pinpoints).to_dict())
    plan = multigrid.plan_image((500, 500), mode=cfg.image.aspect_ratio, pinpoints=cfg.image.grid_pinpoints,
                                convention=cfg.image.convention)
    nh, nw = get_anyres_image_grid_shape((500, 500), pinpoints, 384)
    assert plan.grid == (nw, nh)


def test_presets():
    # The scripts' MANAGER_INJECTION_END=24 at every MODEL_SCALE (SPEC §2.1).
    for size in ("0.5b", "7b", "72b"):
        assert C.preset(size, "grid_manager").injection_layers() == [0, 4, 8, 12, 16, 20]
    assert not C.preset("72b", "grid").manager.enabled
    assert C.tiny(manager_type="adaptive_cross_zerouni").manager.query_type == "cross"
    assert C.tiny(manager_type="adaptive_zerouni").manager.query_type == "none"


@pytest.mark.parametrize("change, message", [
    (dict(manager=C.ManagerConfig(type="bogus")), "manager.type"),
    (dict(manager=C.ManagerConfig(grid_type="left")), "grid_type"),
    (dict(manager=C.ManagerConfig(residual=False)), "residual"),
    (dict(manager=C.ManagerConfig(vision_select_layers_end=40)), "select layers"),
    (dict(remat_policy="sometimes"), "remat_policy"),
    (dict(image=C.ImageConfig(convention="pytorch")), "convention"),
])
def test_invalid_configs_raise_clear_errors(change, message):
    with pytest.raises(C.ConfigError, match=message):
        C.preset("0.5b", "grid_manager").replace(**change)


# A config.json may leave out what equals transformers' defaults (save_pretrained writes a diff
# against them; Qwen2Config's are rope_theta 1e4 and untied embeddings). Neither is checked against
# a tensor shape, so a wrong default silently changes the model.
_QWEN2_DROPS = [
    pytest.param(("rope_theta",), id="no-rope_theta"),
    pytest.param(("tie_word_embeddings",), id="no-tie"),
]


@pytest.mark.parametrize("drop", _QWEN2_DROPS)
def test_omitted_qwen2_fields_mean_what_transformers_reads(drop):
    from transformers import Qwen2Config

    raw = {k: v for k, v in _original_config(True, True).items() if k not in drop}
    want = Qwen2Config.from_dict(dict(raw, model_type="qwen2"))
    text = C.ModelConfig.from_original_config(raw).text
    assert text.rope_theta == want.rope_parameters["rope_theta"]
    assert text.tie_word_embeddings == want.tie_word_embeddings


@pytest.mark.parametrize("drop", _QWEN2_DROPS)
def test_omitted_hf_text_fields_mean_what_transformers_reads(drop):
    from transformers import LlavaOnevisionConfig

    from manager_jax.reference.hf_tiny import tiny_hf_config

    raw = tiny_hf_config(vision_layers=2, text_layers=2, tie_word_embeddings=True).to_dict()
    for key in drop:  # from both levels; rope_theta lives in rope_parameters in transformers 5.x
        raw.pop(key, None)
        raw["text_config"].pop("rope_parameters" if key == "rope_theta" else key, None)
    want = LlavaOnevisionConfig.from_dict(raw)
    text = C.ModelConfig.from_hf_config(raw).text
    assert text.rope_theta == want.text_config.rope_parameters["rope_theta"]
    assert text.tie_word_embeddings == want.tie_word_embeddings


def test_flat_anyres_with_a_grid_manager_is_refused_at_validation():
    """mm_patch_merge_type flat + anyres tiling is the original's flat branch (supported, see
    tests/test_parity_manager.py); with grid_type "grid" the original misplaces the update by 729
    tokens, so the config is refused when built, not at the first image."""
    base = C.ModelConfig()
    flat = C.dataclasses.replace(base.image, patch_merge_type="flat")
    C.ModelConfig(image=flat, manager=C.dataclasses.replace(base.manager, grid_type="all"))
    with pytest.raises(C.ConfigError, match="grid_type 'grid' with mm_patch_merge_type 'flat'"):
        C.ModelConfig(image=flat, manager=C.dataclasses.replace(base.manager, grid_type="grid"))
    C.ModelConfig(image=C.dataclasses.replace(flat, aspect_ratio="square", grid_pinpoints=None),
                manager=C.dataclasses.replace(base.manager, grid_type="grid"))


# Settings of real checkpoints' config.json that change the numbers but that our model does not
# implement: read as the defaults they silently gave another model than transformers runs.
_UNSUPPORTED_TEXT = [
    pytest.param({"use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 1}, "sliding window",
                 id="sliding-window"),
    pytest.param({"use_sliding_window": True, "sliding_window": 4096,
                  "layer_types": ["full_attention", "sliding_attention"]}, "sliding window",
                 id="layer-types"),
    pytest.param({"hidden_act": "gelu"}, "hidden_act", id="hidden-act"),
    pytest.param({"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
                 "rope", id="rope-scaling"),
]


@pytest.mark.parametrize("change, message", _UNSUPPORTED_TEXT)
def test_qwen2_settings_we_do_not_implement_are_refused(change, message):
    from transformers import Qwen2Config

    raw = dict(_original_config(False, False), num_hidden_layers=2, **change)
    hf = Qwen2Config.from_dict(dict(raw, model_type="qwen2"))
    # transformers does implement each of these (the sliding window in every attention implementation).
    assert ("sliding_attention" in hf.layer_types or hf.hidden_act != "silu"
            or hf.rope_parameters["rope_type"] != "default")
    with pytest.raises(C.ConfigError, match=message):
        C.ModelConfig.from_original_config(raw)
    hf_raw = _tiny_hf_dict()
    hf_raw["text_config"].pop("layer_types")  # to_dict() wrote the ones of the config it came from
    hf_raw["text_config"].update(change, num_hidden_layers=2)
    with pytest.raises(C.ConfigError, match=message):
        C.ModelConfig.from_hf_config(hf_raw)


def test_released_qwen2_sliding_window_fields_are_accepted():
    """Qwen2-Instruct configs carry sliding_window / max_window_layers with use_sliding_window false."""
    raw = dict(_original_config(False, False), use_sliding_window=False, sliding_window=32768, max_window_layers=21,
               hidden_act="silu", rope_scaling=None)
    assert C.ModelConfig.from_original_config(raw).text == C.preset("0.5b", "baseline").text


def _tiny_hf_dict(**kw) -> dict:
    from manager_jax.reference.hf_tiny import tiny_hf_config

    return tiny_hf_config(vision_layers=3, text_layers=2, **kw).to_dict()


@pytest.mark.parametrize("change, message", [
    pytest.param({"vision_feature_select_strategy": "default"}, "vision_feature_select_strategy", id="strategy"),
    pytest.param({"vision_feature_layer": [-2, -1]}, "vision_feature_layer", id="layer-list"),
    pytest.param({"vision_feature_layer": -5}, "vision_feature_layer", id="layer-out-of-range"),
    pytest.param({"projector_hidden_act": "relu"}, "projector_hidden_act", id="projector-act"),
    pytest.param({"vision_config": {"hidden_act": "gelu"}}, "hidden_act", id="vision-act"),
])
def test_hf_vision_settings_we_do_not_implement_are_refused(change, message):
    raw = _tiny_hf_dict()
    for key, value in change.items():
        if isinstance(value, dict):
            raw[key].update(value)
        else:
            raw[key] = value
    with pytest.raises(C.ConfigError, match=message):
        C.ModelConfig.from_hf_config(raw)


def test_original_projector_type_is_read():
    raw = dict(_original_config(False, False), mm_projector_type="linear")
    with pytest.raises(C.ConfigError, match="mlp2x_gelu"):
        C.ModelConfig.from_original_config(raw)
