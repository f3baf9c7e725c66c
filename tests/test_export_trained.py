"""Train on a mesh, export for release, load the export in PyTorch.

The demo recipe trains a few steps with FSDP over 8 (fake CPU) devices and checkpoints; the final
training checkpoint is exported with `python -m tools.convert_weights from-orbax`, as a user
would. The HF export (a baseline: transformers has no Manager) must give, in transformers'
`LlavaOnevisionForConditionalGeneration`, the logits of our model with the parameters the run
ended with (held in memory, not read back from the checkpoint); the original-layout export of a
Manager model must give them in the PyTorch Manager reference. `to-orbax` of the export gives the
trained parameters back bit for bit.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from manager_jax import params_io
from manager_jax.data.tokenizer import load_tokenizer
from manager_jax.infer.loading import read_eos_ids
from manager_jax.reference.parity import random_image
from manager_jax.train import loop as loop_lib
from manager_jax.train.recipe import load_recipe
from tests.train_batches import compile_cache_fixture
from tools.convert_weights import verify
from tools.convert_weights.configs_out import expand_pinpoints
from tools.convert_weights.sources import open_torch_source

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "demo.py")
TOL = 1e-5  # relative error of fp32 logits, as tests/test_convert_verify.py

pytestmark = [
    pytest.mark.slow,  # two short training runs on 8 fake devices: about a minute each on 2 cores
    pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py sets 8 fake CPU devices)"),
]

COMMON = ["num_steps=3", "synthetic_records=40", "checkpoint.every_steps=2", "logging.progress_bar=False",
          "logging.tensorboard=False", "mesh.data=2", "mesh.fsdp=4", "loss_token_budget=96"]
# The demo model with LLaVA-OV's baseline image handling (anyres_max_9, unpad + newline) and
# transformers' convention, so that transformers preprocesses as the model was trained.
BASELINE = ["model.manager.type=None", "model.image.aspect_ratio=anyres_max_9",
            "model.image.patch_merge_type=spatial_unpad", "model.image.grid_pinpoints=(1x1),...,(6x6)",
            "model.image.convention=hf", "synthetic_image_sizes=[(384,384)]", "data.max_crops=2",
            "data.max_image_tokens=1485", "data.seq_len=1664"]
MANAGER = ["data.seq_len=832"]  # the demo's own model: square images, a static Manager


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    yield from compile_cache_fixture(tmp_path_factory)


def train(out, overrides):
    """(config, final params as numpy) of a demo run on the data=2 x fsdp=4 mesh."""
    config = load_recipe(DEMO, [f"output_dir={out}"] + COMMON + overrides)
    result = loop_lib.train(config, keep_state=True)
    assert result.status == "completed" and result.last_step == 3
    assert sorted(os.listdir(out / "checkpoints")) == ["2", "3", "config.json"]
    kernel = result.state["params"]["text"]["layers"]["mlp"]["up"]["kernel"]
    assert len({s.device for s in kernel.addressable_shards}) == 8 and "fsdp" in tuple(kernel.sharding.spec)
    return config.model, jax.tree.map(np.asarray, result.state["params"])


def convert(*argv):
    """`python -m tools.convert_weights ARGV` in a fresh process; returns its stdout."""
    proc = subprocess.run([sys.executable, "-m", "tools.convert_weights", *argv, "--quiet"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Orbax warned once per parameter read from a training checkpoint (no step metadata in its item).
    assert "Metadata file does not exist" not in proc.stderr
    return proc.stdout


def assert_same_params(a: dict, b: dict):
    flat_a, flat_b = params_io.flatten_tree(a), params_io.flatten_tree(b)
    assert flat_a.keys() == flat_b.keys()
    for key, x in flat_a.items():
        y = flat_b[key]
        assert x.dtype == y.dtype and x.shape == y.shape, key
        assert np.array_equal(x.view(np.uint8), np.asarray(y).view(np.uint8)), key


def test_trained_baseline_exports_to_transformers(tmp_path):
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer, GenerationConfig, LlavaOnevisionForConditionalGeneration

    cfg, params = train(tmp_path / "run", BASELINE)
    export = tmp_path / "hf"
    convert("from-orbax", str(tmp_path / "run" / "checkpoints"), str(export), "--format", "hf")
    assert {"config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= set(os.listdir(export))

    # transformers on the export alone: its model, image processor, tokenizer and generation config.
    hf = LlavaOnevisionForConditionalGeneration.from_pretrained(str(export), dtype=torch.float32,
                                                                attn_implementation="sdpa").eval()
    case = verify.build_inputs(cfg, (512, 384), seed=1)  # 512x384: a 2x1 grid, unpadded
    # The case's image (build_case draws image i with seed + 1 + i), preprocessed by transformers.
    pixels = AutoImageProcessor.from_pretrained(str(export))(images=[random_image((512, 384), 2)],
                                                             return_tensors="np")
    np.testing.assert_array_equal(pixels["image_sizes"], case.hf_inputs["image_sizes"])
    inputs = {k: torch.from_numpy(v) for k, v in case.hf_inputs.items() if k not in ("labels", "pixel_values")}
    with torch.no_grad():
        ref = hf(**inputs, pixel_values=torch.from_numpy(pixels["pixel_values"]),
                 batch_num_images=torch.tensor(case.batch_num_images)).logits.numpy()
    report = verify.compare_logits(verify.jax_logits(cfg, params, case), ref, case.valid)
    assert report.tokens > 729 and report.relative_error <= TOL and report.top1_agreement == 1.0, report

    tok = AutoTokenizer.from_pretrained(str(export))
    ours = load_tokenizer(None)  # what the run trained with
    for text in ("<|im_start|>user\n<image>\nWhat colour is the circle?<|im_end|>\n", "Cafe\u0301 你好 12345\n\n"):
        assert tok.encode(text) == ours.encode(text)
    generation = GenerationConfig.from_pretrained(str(export))
    assert (generation.eos_token_id, generation.pad_token_id) == (ours.eos_ids, ours.pad_id)

    back = tmp_path / "back"
    convert("to-orbax", str(export), str(back))
    back_cfg, back_params = params_io.load_params(str(back))
    # `run.py generate --checkpoint BACK` reads its tokenizer and eos ids from there.
    assert read_eos_ids(str(back), []) == ours.eos_ids and os.path.isdir(back / "tokenizer")
    assert (back_cfg.text, back_cfg.vision, back_cfg.image.convention) == (cfg.text, cfg.vision, cfg.image.convention)
    assert expand_pinpoints(back_cfg.image.grid_pinpoints) == expand_pinpoints(cfg.image.grid_pinpoints)
    assert_same_params(back_params, params)


def test_trained_manager_exports_to_the_original_layout(tmp_path):
    cfg, params = train(tmp_path / "run", MANAGER)
    # The static Manager starts from zero scores: training must have made them non-zero.
    scores = [np.abs(b["layer_scores"]).max() for b in params["manager"]["blocks"].values()]
    assert min(scores) > 0
    export = tmp_path / "llava"
    convert("from-orbax", str(tmp_path / "run" / "checkpoints"), str(export), "--format", "llava")

    case = verify.build_inputs(cfg, (384, 384), seed=2)
    ref, name = verify.torch_logits(open_torch_source(str(export), "llava"), case)
    assert name.startswith("Manager reference (static_zerouni")
    report = verify.compare_logits(verify.jax_logits(cfg, params, case), ref, case.valid)
    assert report.tokens > 729 and report.relative_error <= TOL and report.top1_agreement == 1.0, report
    assert {"generation_config.json", "tokenizer.json"} <= set(os.listdir(export))

    back = tmp_path / "back"
    convert("to-orbax", str(export), str(back))
    assert_same_params(params_io.load_params(str(back))[1], params)
