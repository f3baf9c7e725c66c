"""A separate SigLIP + Qwen2 checkpoint -> the stage-1 starting point."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipConfig, SiglipModel, SiglipVisionModel

from manager_jax import params_io
from manager_jax.config import tiny
from tools.convert_weights import convert
from tools.convert_weights.sources import ConversionError

SIGLIP_LAYERS = 5  # a "27-layer" tower in miniature: the last one must be dropped


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    torch.manual_seed(0)
    qwen = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    Qwen2ForCausalLM(qwen).to(torch.bfloat16).save_pretrained(root / "qwen")
    (root / "qwen" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 32768}))
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=SIGLIP_LAYERS, num_attention_heads=4,
                  patch_size=14, image_size=384)
    full = SiglipConfig(vision_config=vision, text_config=dict(hidden_size=32, intermediate_size=64,
                                                               num_hidden_layers=1, num_attention_heads=4,
                                                               vocab_size=100))
    SiglipModel(full).to(torch.bfloat16).save_pretrained(root / "siglip")
    SiglipVisionModel(full.vision_config).save_pretrained(root / "siglip_vision")  # 5.x: no vision_model. prefix
    return root


def _tensors(directory):
    return load_file(os.path.join(directory, "model.safetensors"))


def test_stage1_start_from_siglip_and_qwen(towers, tmp_path):
    model_config = tiny("grid_manager").to_dict()
    cfg = convert.to_orbax(f"{towers / 'siglip'},{towers / 'qwen'}", str(tmp_path / "p"),
                           model_config=model_config, seed=3)
    assert cfg.vision.num_layers == SIGLIP_LAYERS - 1 and cfg.text.num_layers == 4
    assert cfg.manager == tiny("grid_manager").manager
    _, tree = params_io.load_params(str(tmp_path / "p"))
    siglip, qwen = _tensors(towers / "siglip"), _tensors(towers / "qwen")
    # Copied towers, bit for bit (bf16 kept).
    fc1 = tree["vision"]["layers"]["mlp"]["fc1"]["kernel"]
    assert fc1.shape[0] == SIGLIP_LAYERS - 1
    for i in range(SIGLIP_LAYERS - 1):
        want = siglip[f"vision_model.encoder.layers.{i}.mlp.fc1.weight"].float().numpy().T
        np.testing.assert_array_equal(fc1[i].astype(np.float32), want)
    np.testing.assert_array_equal(tree["text"]["embed"]["embedding"].astype(np.float32),
                                  qwen["model.embed_tokens.weight"].float().numpy())
    np.testing.assert_array_equal(tree["vision"]["post_ln"]["scale"].astype(np.float32),
                                  siglip["vision_model.post_layernorm.weight"].float().numpy())
    # Fresh parts: zero scores, randn/sqrt(D) embeddings, torch-default Linear projector (SPEC §1.2-§2.2).
    d, dv = 64, 64
    blocks = tree["manager"]["blocks"]
    assert all(not np.any(blocks[j]["layer_scores"].astype(np.float32)) for j in blocks)
    emb = tree["manager"]["layer_embedding"].astype(np.float32)
    newline = tree["image_newline"].astype(np.float32)
    assert 0.5 / np.sqrt(d) < emb.std() < 1.5 / np.sqrt(d) and newline.shape == (d,)
    k1 = tree["projector"]["linear1"]["kernel"].astype(np.float32)
    assert np.abs(k1).max() <= 1 / np.sqrt(dv) and k1.std() > 0.8 / np.sqrt(3 * dv)
    assert tree["projector"]["linear1"]["kernel"].dtype == tree["text"]["norm"]["scale"].dtype  # keep -> bf16
    record = json.loads((tmp_path / "p" / "conversion.json").read_text())
    ignored = " ".join(record["ignored_tensors"])
    assert f"encoder.layers.{SIGLIP_LAYERS - 1}." in ignored and "head.probe" in ignored
    assert "text_model." in ignored
    assert "projector.linear1.kernel" in record["fresh_parameters"]
    assert os.path.exists(tmp_path / "p" / "tokenizer" / "tokenizer_config.json")


def test_seed_changes_only_the_fresh_parts(towers, tmp_path):
    src = f"{towers / 'siglip_vision'},{towers / 'qwen'}"
    _, a = convert.load_torch_checkpoint(src, variant="grid", seed=1)
    _, b = convert.load_torch_checkpoint(src, variant="grid", seed=2)
    assert not np.array_equal(a["image_newline"], b["image_newline"])
    np.testing.assert_array_equal(a["vision"]["pos_embed"], b["vision"]["pos_embed"])


def test_variant_defaults_need_real_depths(towers, tmp_path):
    with pytest.raises(ConversionError, match="--model-config"):
        convert.to_orbax(f"{towers / 'siglip_vision'},{towers / 'qwen'}", str(tmp_path / "p"), variant="manager")
    assert not os.path.exists(tmp_path / "p")


def test_wrong_order_is_explained(towers, tmp_path):
    with pytest.raises(ConversionError, match="expected a SigLIP model"):
        convert.to_orbax(f"{towers / 'qwen'},{towers / 'siglip'}", str(tmp_path / "p"))
