"""Round trips through Orbax are byte-identical per tensor: original -> Orbax -> original and
transformers -> Orbax -> transformers, for tiny random checkpoints of every variant."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from manager_jax import params_io
from manager_jax.config import TextConfig, VisionConfig, tiny
from manager_jax.reference.hf_tiny import tiny_hf_config, tiny_hf_model
from tools.convert_weights import configs_out, convert, testing
from tools.convert_weights.mapping import flatten
from tools.convert_weights.sources import ConversionError


def load_dir(directory) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out


def assert_bit_identical(got: dict, want: dict) -> None:
    assert set(got) == set(want), set(got) ^ set(want)
    for key in want:
        a, b = got[key], want[key]
        assert a.dtype == b.dtype and a.shape == b.shape, key
        assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)), key


def _untied(cfg):
    t = cfg.text
    return cfg.replace(text=TextConfig(**{**t.__dict__, "tie_word_embeddings": False}))


ORIGINAL_CASES = [
    pytest.param(tiny("baseline"), torch.float32, 1, id="baseline-fp32"),
    pytest.param(tiny("manager"), torch.bfloat16, 3, id="manager-bf16-sharded"),
    pytest.param(tiny("grid"), torch.float32, 2, id="grid-fp32-sharded"),
    pytest.param(tiny("grid_manager"), torch.bfloat16, 1, id="grid_manager-bf16"),
    pytest.param(_untied(tiny("grid_manager", manager_type="adaptive_cross_zerouni")), torch.float16, 2,
                 id="adaptive_cross-untied-fp16"),
    pytest.param(tiny("manager", manager_type="adaptive_average_zerouni"), torch.float32, 1, id="adaptive_average"),
]


@pytest.mark.parametrize("cfg, dtype, shards", ORIGINAL_CASES)
def test_original_orbax_original_is_bit_identical(tmp_path, cfg, dtype, shards):
    src, mid, out = tmp_path / "src", tmp_path / "orbax", tmp_path / "back"
    written, _, _ = testing.write_original_checkpoint(str(src), cfg, dtype=dtype, num_shards=shards)
    got_cfg = convert.to_orbax(str(src), str(mid))
    assert got_cfg.replace(image=cfg.image) == cfg
    assert (got_cfg.image.patch_merge_type, got_cfg.image.aspect_ratio) == (cfg.image.patch_merge_type,
                                                                            cfg.image.aspect_ratio)
    convert.from_orbax(str(mid), str(out), fmt="llava", max_shard_size="200KB")
    assert_bit_identical(load_dir(out), written)
    # Every field of the source config.json survives; the model-defining ones are rewritten equal.
    before = json.loads((src / "config.json").read_text())
    after = json.loads((out / "config.json").read_text())
    assert {k: v for k, v in after.items() if k in before} == before
    if cfg.manager.enabled:
        assert after["mm_manager_index_list"] == cfg.injection_layers()
        assert after["mm_manager_select_layer_index_list"] == cfg.manager.select_layers
    assert (os.path.exists(out / "model.safetensors.index.json")) == (len(os.listdir(out)) > 2)


def test_vision_config_inferred_from_tensors_when_not_declared(tmp_path):
    """Released original configs only name the SigLIP path: dimensions come from the tensors."""
    cfg = tiny("grid").replace(vision=VisionConfig(hidden_size=144, intermediate_size=96, num_layers=3, num_heads=2))
    testing.write_original_checkpoint(str(tmp_path / "src"), cfg, declare_vision=False)
    assert "vision_config" not in json.loads((tmp_path / "src" / "config.json").read_text())
    got = convert.to_orbax(str(tmp_path / "src"), str(tmp_path / "p"))
    assert got.vision == cfg.vision  # width 144 = 2 heads of 72 (so400m's head size)


def _hf_model(tied: bool, seed: int = 1):
    return tiny_hf_model(tiny_hf_config(vision_layers=3, text_layers=2, tie_word_embeddings=tied), seed=seed)


@pytest.mark.parametrize("tied", [True, False])
def test_hf_orbax_hf_is_bit_identical(tmp_path, tied):
    model = _hf_model(tied)
    model.save_pretrained(tmp_path / "src", max_shard_size="60KB")
    assert os.path.exists(tmp_path / "src" / "model.safetensors.index.json")
    convert.to_orbax(str(tmp_path / "src"), str(tmp_path / "p"), dtype="keep")
    convert.from_orbax(str(tmp_path / "p"), str(tmp_path / "back"), fmt="hf")
    assert_bit_identical(load_dir(tmp_path / "back"), load_dir(tmp_path / "src"))
    before = json.loads((tmp_path / "src" / "config.json").read_text())
    after = json.loads((tmp_path / "back" / "config.json").read_text())
    for key in ("image_grid_pinpoints", "image_token_index", "vision_aspect_ratio", "tie_word_embeddings"):
        assert after[key] == before[key], key
    for key in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "vocab_size", "rope_parameters"):
        assert after["text_config"][key] == before["text_config"][key], key
    assert os.path.exists(tmp_path / "back" / "generation_config.json")  # carried via the params dir
    assert "manager_jax_image_convention" not in after  # transformers' own convention: nothing to record


def test_legacy_hf_names_round_trip_and_match_v5(tmp_path):
    """Hub checkpoints of transformers 4.4x: vision_tower.vision_model.*, language_model.lm_head.weight."""
    model = _hf_model(tied=False, seed=2)
    model.save_pretrained(tmp_path / "v5")
    legacy = {}
    for key, t in load_dir(tmp_path / "v5").items():
        if key.startswith("vision_tower."):
            key = "vision_tower.vision_model." + key[len("vision_tower."):]
        legacy[key] = t
    os.makedirs(tmp_path / "legacy")
    testing.save_sharded(str(tmp_path / "legacy"), legacy, num_shards=2)
    (tmp_path / "legacy" / "config.json").write_text((tmp_path / "v5" / "config.json").read_text())
    convert.to_orbax(str(tmp_path / "legacy"), str(tmp_path / "p_legacy"))
    convert.to_orbax(str(tmp_path / "v5"), str(tmp_path / "p_v5"))
    _, a = params_io.load_params(str(tmp_path / "p_legacy"))
    _, b = params_io.load_params(str(tmp_path / "p_v5"))
    assert params_io.check_tree(a, b) == []
    for path, leaf in flatten(a).items():
        assert np.array_equal(leaf, flatten(b)[path])
    convert.from_orbax(str(tmp_path / "p_legacy"), str(tmp_path / "back"), fmt="hf")  # auto: legacy names
    assert_bit_identical(load_dir(tmp_path / "back"), legacy)


def test_original_and_hf_layouts_of_one_model_give_the_same_tree(tmp_path):
    """The original-layout key names (SPEC §6.1) and transformers' names meet in the same tree."""
    cfg = tiny("grid").replace(text=TextConfig(**{**tiny("grid").text.__dict__, "num_layers": 2}),
                               vision=VisionConfig(**{**tiny("grid").vision.__dict__, "num_layers": 3}))
    model = _hf_model(tied=True, seed=4)
    model.save_pretrained(tmp_path / "hf")
    os.makedirs(tmp_path / "orig")
    testing.save_sharded(str(tmp_path / "orig"), testing.original_state_dict(model, cfg), num_shards=2)
    (tmp_path / "orig" / "config.json").write_text(json.dumps(testing.original_config_json(cfg)))
    cfg_hf, tree_hf = convert.load_torch_checkpoint(str(tmp_path / "hf"))
    cfg_orig, tree_orig = convert.load_torch_checkpoint(str(tmp_path / "orig"))
    assert cfg_hf.text == cfg_orig.text and cfg_hf.vision == cfg_orig.vision
    flat_hf, flat_orig = flatten(tree_hf), flatten(tree_orig)
    assert set(flat_hf) == set(flat_orig)
    for path in flat_hf:
        assert np.array_equal(flat_hf[path], flat_orig[path]), path


def test_manager_model_through_hf_export_and_back(tmp_path):
    """An HF export keeps Manager tensors verbatim, mm_manager_* fields and the image convention:
    reading it back gives the same model (config and tensors)."""
    cfg = tiny("grid_manager")
    written, _, _ = testing.write_original_checkpoint(str(tmp_path / "src"), cfg, dtype=torch.bfloat16)
    p1 = convert.to_orbax(str(tmp_path / "src"), str(tmp_path / "p1"))
    assert p1.image.convention == "original"
    # An original-convention model is not silently exported for transformers' preprocessing.
    with pytest.raises(ConversionError, match="--accept-hf-convention"):
        convert.from_orbax(str(tmp_path / "p1"), str(tmp_path / "hf"), fmt="hf")
    assert not os.path.exists(tmp_path / "hf")
    convert.from_orbax(str(tmp_path / "p1"), str(tmp_path / "hf"), fmt="hf", accept_hf_convention=True)
    hf_keys = set(load_dir(tmp_path / "hf"))
    assert "model.manager.0.layer_scores" in hf_keys and "language_model.model.embed_tokens.weight" in hf_keys
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["manager_jax_image_convention"] == "original"
    got = convert.to_orbax(str(tmp_path / "hf"), str(tmp_path / "p2"))
    assert got.manager == cfg.manager and got.image.convention == "original"
    assert got.text == p1.text and got.vision == p1.vision and got.image_token_id == p1.image_token_id
    assert configs_out.expand_pinpoints(got.image.grid_pinpoints) == configs_out.expand_pinpoints(p1.image.grid_pinpoints)
    convert.from_orbax(str(tmp_path / "p2"), str(tmp_path / "back"), fmt="llava")
    assert_bit_identical(load_dir(tmp_path / "back"), written)


@pytest.mark.parametrize("dtype, expect", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_dtype_conversion(tmp_path, dtype, expect):
    cfg = tiny("manager")
    written, _, _ = testing.write_original_checkpoint(str(tmp_path / "src"), cfg, dtype=torch.float32)
    convert.to_orbax(str(tmp_path / "src"), str(tmp_path / "p"), dtype=dtype)
    convert.from_orbax(str(tmp_path / "p"), str(tmp_path / "back"), fmt="llava")
    back = load_dir(tmp_path / "back")
    for key, t in written.items():
        assert back[key].dtype == expect
        assert torch.equal(back[key], t.to(expect)), key  # torch's own fp32 -> bf16 rounding
    # And the export dtype flag on the way out.
    convert.from_orbax(str(tmp_path / "p"), str(tmp_path / "fp32"), fmt="llava", dtype="fp32")
    assert all(t.dtype == torch.float32 for t in load_dir(tmp_path / "fp32").values())


def test_flat_model_cannot_be_exported_as_hf(tmp_path):
    testing.write_original_checkpoint(str(tmp_path / "src"), tiny("baseline"))
    convert.to_orbax(str(tmp_path / "src"), str(tmp_path / "p"))
    with pytest.raises(ConversionError, match="image_newline"):
        convert.from_orbax(str(tmp_path / "p"), str(tmp_path / "hf"), fmt="hf")
    assert not os.path.exists(tmp_path / "hf")


def test_training_checkpoint_as_source(tmp_path):
    """A training run directory (numbered steps with a `params` item): the latest step is exported."""
    import orbax.checkpoint as ocp

    cfg = tiny("manager")
    written, _, _ = testing.write_original_checkpoint(str(tmp_path / "src"), cfg)
    _, tree = convert.load_torch_checkpoint(str(tmp_path / "src"))
    older = {k: v for k, v in tree.items()}
    older["text"] = {**tree["text"], "norm": {"scale": tree["text"]["norm"]["scale"] * 0}}
    with ocp.CheckpointManager(str(tmp_path / "run"), item_names=("params",)) as mngr:
        mngr.save(100, args=ocp.args.Composite(params=ocp.args.StandardSave(older)))
        mngr.save(200, args=ocp.args.Composite(params=ocp.args.StandardSave(tree)))
        mngr.wait_until_finished()
    cfg.save(str(tmp_path / "run" / "config.json"))
    convert.from_orbax(str(tmp_path / "run"), str(tmp_path / "back"), fmt="llava")
    assert_bit_identical(load_dir(tmp_path / "back"), written)
    # to-orbax from a training run: a params directory (here also changing the dtype).
    got = convert.to_orbax(str(tmp_path / "run"), str(tmp_path / "p"), dtype="bf16")
    assert got == cfg
    _, bf16 = params_io.load_params(str(tmp_path / "p"))
    assert str(bf16["text"]["norm"]["scale"].dtype) == "bfloat16"
    np.testing.assert_array_equal(bf16["text"]["norm"]["scale"].astype(np.float32),
                                  written["model.norm.weight"].to(torch.bfloat16).float().numpy())


def test_hf_config_declaring_the_full_27_layer_siglip(tmp_path):
    """An HF config with SigLIP's 27 layers and vision_feature_layer -2: LLaVA-OV uses 26, so layer 26 (and a
    tied lm_head) is skipped."""
    hf_cfg = tiny_hf_config(vision_layers=27, text_layers=2)
    hf_cfg.vision_feature_layer = -2  # hidden_states[-2] of 27 layers: the output of layer 25 (SPEC §1.1)
    model = tiny_hf_model(hf_cfg, seed=6)
    model.save_pretrained(tmp_path / "src")
    tensors = load_dir(tmp_path / "src")
    tensors["language_model.lm_head.weight"] = tensors["language_model.model.embed_tokens.weight"].clone()
    os.remove(tmp_path / "src" / "model.safetensors")
    testing.save_sharded(str(tmp_path / "src"), tensors)
    cfg = convert.to_orbax(str(tmp_path / "src"), str(tmp_path / "p"))
    assert cfg.vision.num_layers == 26
    record = json.loads((tmp_path / "p" / "conversion.json").read_text())
    assert "language_model.lm_head.weight (tied to the embedding)" in record["ignored_tensors"]
    assert sum("encoder.layers.26." in k for k in record["ignored_tensors"]) == 16
    _, tree = params_io.load_params(str(tmp_path / "p"))
    np.testing.assert_array_equal(tree["vision"]["layers"]["mlp"]["fc1"]["kernel"][25],
                                  tensors["vision_tower.encoder.layers.25.mlp.fc1.weight"].numpy().T)


def test_exported_pinpoints_take_every_form_the_model_reads():
    # A literal list string is a form the model's token plan reads (multigrid.parse_pinpoints);
    # the export used its own range-string parser and refused it.
    cfg = tiny()
    cfg = cfg.replace(image=dataclasses.replace(cfg.image, grid_pinpoints="[[384, 768], [768, 1152]]",
                                                convention="original"))
    assert configs_out.original_config(cfg, np.float32)["image_grid_pinpoints"] == [[384, 768], [768, 1152]]
    # transformers reads (height, width): the pairs are swapped for it
    assert configs_out.hf_config(cfg, np.float32)["image_grid_pinpoints"] == [[768, 384], [1152, 768]]


def test_untied_hf_checkpoint_whose_config_omits_tie_word_embeddings(tmp_path):
    """transformers reads an absent tie_word_embeddings as False (Qwen2Config's default): the
    checkpoint's lm_head is the model's output layer and must not be dropped as a tied copy."""
    model = _hf_model(tied=False, seed=4)
    model.save_pretrained(tmp_path / "src")
    raw = json.loads((tmp_path / "src" / "config.json").read_text())
    raw.pop("tie_word_embeddings")
    raw["text_config"].pop("tie_word_embeddings")
    (tmp_path / "src" / "config.json").write_text(json.dumps(raw))
    cfg = convert.to_orbax(str(tmp_path / "src"), str(tmp_path / "p"))
    assert not cfg.text.tie_word_embeddings
    tree = params_io.load_params(str(tmp_path / "p"))[1]
    np.testing.assert_array_equal(tree["lm_head"]["kernel"], model.lm_head.weight.detach().numpy().T)


def test_fp16_export_loads_in_transformers_as_torch_half_of_the_source(tmp_path):
    """--dtype fp16 (what the original evaluates in): transformers loads exactly torch's .half() of
    the fp32 source, including a value just under float16's largest (65519 rounds to 65504)."""
    from transformers import LlavaOnevisionForConditionalGeneration

    model = _hf_model(tied=False, seed=5)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = 65519.0
        model.lm_head.weight[0, 1] = 1e-7  # an fp16 subnormal
    model.save_pretrained(tmp_path / "src")
    convert.to_orbax(str(tmp_path / "src"), str(tmp_path / "p"))
    convert.from_orbax(str(tmp_path / "p"), str(tmp_path / "fp16"), fmt="hf", dtype="fp16")
    config = json.loads((tmp_path / "fp16" / "config.json").read_text())
    assert config["dtype"] == config["text_config"]["dtype"] == "float16"  # not the source's float32
    # dtype "auto": the dtype the config declares, not a cast asked for here.
    loaded = LlavaOnevisionForConditionalGeneration.from_pretrained(str(tmp_path / "fp16"), dtype="auto")
    assert_bit_identical(loaded.state_dict(), model.half().state_dict())


def test_fp16_export_refuses_a_value_beyond_its_range(tmp_path, capsys):
    from tools.convert_weights.cli import main

    model = _hf_model(tied=True, seed=6)
    with torch.no_grad():
        model.model.multi_modal_projector.linear_1.weight[3, 2] = 1e6  # inf in fp16
    model.save_pretrained(tmp_path / "src")
    convert.to_orbax(str(tmp_path / "src"), str(tmp_path / "p"))
    capsys.readouterr()
    assert main(["from-orbax", str(tmp_path / "p"), str(tmp_path / "out"), "--format", "hf", "--dtype", "fp16",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "linear_1.weight" in err and "1e+06" in err and "--dtype bf16" in err, err
    assert "Warning" not in err and sorted(os.listdir(tmp_path)) == ["p", "src"]  # no partial or temporary output
    assert main(["from-orbax", str(tmp_path / "p"), str(tmp_path / "out"), "--format", "hf", "--dtype", "bf16",
                 "--quiet"]) == 0
