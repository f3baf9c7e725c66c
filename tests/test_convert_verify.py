"""A checkpoint written in a PyTorch layout, converted, and run by our model gives the reference's
logits (fp32, relative error <= 1e-5); `verify` reports and gates on the difference."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from manager_jax import params_io
from manager_jax.config import tiny
from manager_jax.reference.hf_tiny import tiny_hf_config, tiny_hf_model
from tools.convert_weights import convert, testing, verify
from tools.convert_weights.cli import main
from tools.convert_weights.sources import ConversionError

TOL = 1e-5


@pytest.fixture(scope="module")
def manager_ckpt(tmp_path_factory):
    """Original layout, grid + static Manager with non-zero scores (zero init would hide bugs)."""
    root = tmp_path_factory.mktemp("verify")
    _, _, manager = testing.write_original_checkpoint(str(root / "torch"), tiny("grid_manager"), seed=3)
    assert any(np.abs(v.numpy()).sum() > 0 for k, v in manager.items() if "layer_scores" in k)
    convert.to_orbax(str(root / "torch"), str(root / "jax"))
    return root


def test_original_manager_checkpoint_matches_reference(manager_ckpt):
    report = verify.verify(str(manager_ckpt / "torch"), str(manager_ckpt / "jax"), image_size=(420, 380))
    print(f"\nPARITY convert original grid_manager:\n{report}")
    assert report.reference.startswith("Manager reference (static_zerouni")
    assert report.tokens > 729  # the image really is in the compared sequence
    assert report.relative_error <= TOL
    assert report.top1_agreement == 1.0 and report.failures() == []


def test_hf_baseline_matches_transformers(tmp_path):
    model = tiny_hf_model(tiny_hf_config(vision_layers=3, text_layers=3), seed=5)
    model.save_pretrained(tmp_path / "torch")
    convert.to_orbax(str(tmp_path / "torch"), str(tmp_path / "jax"), dtype="fp32")
    report = verify.verify(str(tmp_path / "torch"), str(tmp_path / "jax"), image_size=(384, 420))
    print(f"\nPARITY convert hf baseline:\n{report}")
    assert report.reference.startswith("transformers")
    assert report.relative_error <= TOL and report.failures() == []


def test_cli_fails_on_a_damaged_conversion(manager_ckpt, tmp_path, capsys):
    """One scrambled parameter (the layer-0 Manager scores) must trip the gate: exit status 1."""
    cfg, tree = params_io.load_params(str(manager_ckpt / "jax"))
    scores = tree["manager"]["blocks"][1]["layer_scores"]
    tree["manager"]["blocks"][1]["layer_scores"] = scores[::-1].copy()  # layers swapped
    params_io.save_params(str(tmp_path / "bad"), tree, cfg)
    code = main(["verify", "--torch", str(manager_ckpt / "torch"), "--jax", str(tmp_path / "bad"),
                 "--image-size", "384x384", "--max-kl", "1e-9"])
    out = capsys.readouterr().out
    assert code == 1 and "FAILED" in out and "KL" in out


def test_mismatched_models_are_refused(manager_ckpt, tmp_path):
    cfg = json.loads((manager_ckpt / "jax" / "config.json").read_text())
    tree = params_io.load_params(str(manager_ckpt / "jax"))[1]
    other = tiny("grid_manager").replace(image_token_id=499)
    params_io.save_params(str(tmp_path / "other"), tree, other)
    with pytest.raises(ConversionError, match="image_token_id differs"):
        verify.verify(str(manager_ckpt / "torch"), str(tmp_path / "other"))
    assert cfg["image_token_id"] == 500


def test_compare_logits_statistics():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((1, 4, 10))
    ours = ref.copy()
    ours[0, 2, 3] += 5.0  # changes the argmax of one position at most and adds KL there only
    valid = np.array([[True, True, True, False]])
    r = verify.compare_logits(ours, ref, valid)
    assert r.tokens == 3 and r.max_abs_diff == pytest.approx(5.0)
    p = jax.nn.softmax(ref[0, 2])
    q = jax.nn.softmax(ours[0, 2])
    kl = float(np.sum(p * (np.log(p) - np.log(q))))
    assert r.max_kl == pytest.approx(kl, rel=1e-6) and r.mean_kl == pytest.approx(kl / 3, rel=1e-6)
    assert r.top1_agreement == pytest.approx((2 + (ours[0, 2].argmax() == ref[0, 2].argmax())) / 3)
    chunked = verify.compare_logits(ours, ref, valid, chunk=2)
    assert chunked.max_kl == r.max_kl and chunked.relative_error == pytest.approx(r.relative_error)


def _rope_permuted(w: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k projection rows reordered from the half-split RoPE layout to the interleaved one within each
    head, as converters for interleaved-RoPE models do: a wrong conversion for Qwen2 (SPEC §1.4)."""
    head_dim = w.shape[0] // heads
    return w.reshape(heads, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


@pytest.fixture(scope="module")
def rope_case(tmp_path_factory):
    """An HF checkpoint converted correctly (fp32 and bf16) and one converted with RoPE-permuted q/k rows."""
    root = tmp_path_factory.mktemp("rope")
    config = tiny_hf_config(vision_layers=2, text_layers=2)
    tiny_hf_model(config, seed=5).save_pretrained(root / "torch")
    shutil.copytree(root / "torch", root / "permuted")
    tensors = load_file(root / "permuted" / "model.safetensors")
    text = config.text_config
    for key in tensors:
        if key.startswith("language_model.") and (".q_proj." in key or ".k_proj." in key):
            heads = text.num_attention_heads if ".q_proj." in key else text.num_key_value_heads
            tensors[key] = _rope_permuted(tensors[key], heads)
    save_file(tensors, root / "permuted" / "model.safetensors", metadata={"format": "pt"})
    convert.to_orbax(str(root / "torch"), str(root / "fp32"), dtype="fp32")
    convert.to_orbax(str(root / "torch"), str(root / "bf16"), dtype="bf16")
    convert.to_orbax(str(root / "permuted"), str(root / "wrong"), dtype="fp32")
    return root


@pytest.mark.parametrize("params", ["fp32", "bf16"])
def test_default_thresholds_pass_a_correct_conversion(rope_case, params, capsys):
    code = main(["verify", "--torch", str(rope_case / "torch"), "--jax", str(rope_case / params),
                 "--image-size", "384x384"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.rstrip().endswith("OK")


def test_default_thresholds_fail_rope_permuted_q_k(rope_case, capsys):
    """Flat logits of a random model keep the KL of this wrong layout tiny; the relative error shows it."""
    code = main(["verify", "--torch", str(rope_case / "torch"), "--jax", str(rope_case / "wrong"),
                 "--image-size", "384x384", "--min-top1", "0"])
    out = capsys.readouterr().out
    assert code == 1, out
    failed = [line for line in out.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and "relative error" in failed[0] and "KL" not in failed[0], out
