"""Parity with the PyTorch Manager reference (manager_jax/reference/torch_manager.py, written from
SPEC §2-§3 on top of transformers), random non-zero Manager parameters, original convention.

Every manager type x grid type on a chat sample with an anyres_max_9 image; the adaptive query of a
plain prompt with an anyres_max_9 image per grid type; the no-grid (flat)
checkpoints with and without a Manager; a multi-image pad sample; a batch with a text-only row;
and truncation after image expansion.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from manager_jax.config import ImageConfig, ManagerConfig, ModelConfig
from manager_jax.data.conversation import IMAGE_TOKEN_INDEX as IMG
from manager_jax.reference.hf_tiny import tiny_hf_config, tiny_hf_model
from manager_jax.reference.parity import SampleSpec, build_case, jax_model_from_torch, relative_error
from manager_jax.reference.torch_manager import ManagerSettings, init_manager_params, reference_from_hf_and_manager

TOL = 1e-5
IMS, IME, NL = 450, 451, 198  # <|im_start|>, <|im_end|>, "\n" stand-ins inside the tiny vocabulary


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model(tiny_hf_config(vision_layers=4, text_layers=4), seed=1, attn_implementation="sdpa")


def _configs(hf, manager_type, grid_type, *, grid=True):
    base = ModelConfig.from_hf_config(hf.config.to_dict())
    image = ImageConfig(grid_pinpoints=base.image.grid_pinpoints, convention="original") if grid else ImageConfig(
        aspect_ratio="square", grid_pinpoints=None, patch_merge_type="flat", convention="original")
    manager = ManagerConfig(type=manager_type, grid_type=grid_type, vision_select_layers_start=1,
                            vision_select_layers_end=5, injection_start=0, injection_interval=2, injection_end=4) \
        if manager_type else ManagerConfig(type=None)
    cfg = base.replace(image=image, manager=manager)
    settings = ManagerSettings(
        manager_type=manager_type or "static_zerouni", grid_type=grid_type,
        select_layers=manager.select_layers if manager_type else [1, 2],
        injection_layers=cfg.injection_layers() or [0], convention="original",
        image_aspect_ratio=image.aspect_ratio, merge_type=image.patch_merge_type,
        image_grid_pinpoints=base.image.grid_pinpoints, im_start_id=IMS,
    )
    return cfg, settings


def _chat(rng, n_images=1):
    """system turn, user turn with text around the image(s), assistant turn (SPEC §4 layout)."""
    t = lambda n: [int(v) for v in rng.integers(1, 400, n)]
    user = t(3)
    for _ in range(n_images):
        user += [IMG] + t(2)
    return [IMS] + t(4) + [IME, NL, IMS, 7, NL] + user + t(5) + [IME, NL, IMS, 8, NL] + t(6) + [IME, NL]


def _parity(hf, cfg, settings, samples, *, nonzero=True, seed=0, seq_len=None):
    mparams = init_manager_params(settings, cfg.text.hidden_size, seed=seed, nonzero=nonzero) \
        if cfg.manager.enabled else {}
    ours = jax_model_from_torch(cfg, hf, mparams)
    ref = reference_from_hf_and_manager(hf, mparams if cfg.manager.enabled else
                                        init_manager_params(settings, cfg.text.hidden_size, nonzero=False), settings)
    # The reference takes the full expanded sequence and truncates it itself (model_max_length).
    full = build_case(cfg, samples, seed=seed, im_start_id=IMS)
    case = build_case(cfg, samples, seed=seed, im_start_id=IMS, seq_len=seq_len) if seq_len else full
    inputs = {k: torch.from_numpy(v) for k, v in full.hf_inputs.items() if k != "labels"}
    with torch.no_grad():
        ref_logits, _ = ref(**inputs, batch_num_images=full.batch_num_images)
    got = np.asarray(ours(jax.tree.map(jnp.asarray, case.batch.to_model_inputs())))
    assert ref_logits.shape[1] == got.shape[1]
    return relative_error(got, ref_logits.numpy(), case.valid), case


MANAGER_TYPES = ["static_zerouni", "adaptive_zerouni", "adaptive_last_zerouni", "adaptive_average_zerouni",
                 "adaptive_cross_zerouni"]


@pytest.mark.parametrize("grid_type", ["all", "main", "grid"])
@pytest.mark.parametrize("manager_type", MANAGER_TYPES)
def test_manager_types_and_grid_types(hf, manager_type, grid_type):
    cfg, settings = _configs(hf, manager_type, grid_type)
    rng = np.random.default_rng(3)
    err, case = _parity(hf, cfg, settings, [SampleSpec(_chat(rng), [(700, 330)])])
    assert case.batch.plan_manager.sum() > 0
    if cfg.manager.query_type in ("last", "average", "cross"):
        assert case.batch.query_mask.any()  # the adaptive query really is exercised
    print(f"PARITY manager {manager_type}/{grid_type}: {err:.2e}")
    assert err <= TOL, err


@pytest.mark.parametrize("grid_type", ["all", "main", "grid"])
@pytest.mark.parametrize("manager_type", ["adaptive_average_zerouni", "adaptive_cross_zerouni"])
def test_plain_prompt_query_with_an_anyres_image(hf, manager_type, grid_type):
    """Plain prompt (stage-1 layout, no <|im_start|>): the extra query starts at L, the length of the
    last image's Manager features, not of its tokens: 729 for "main", the grid part for "grid"."""
    cfg, settings = _configs(hf, manager_type, grid_type)
    rng = np.random.default_rng(9)
    err, case = _parity(hf, cfg, settings, [SampleSpec([IMG] + [int(v) for v in rng.integers(1, 400, 12)] + [NL],
                                                        [(500, 300)])])
    assert case.batch.query_mask.any()
    print(f"PARITY plain prompt {manager_type}/{grid_type}: {err:.2e}")
    assert err <= TOL, err


def test_manager_really_changes_logits(hf):
    """Guards the parity tests: a non-zero Manager must move the logits (zero-init hides bugs)."""
    cfg, settings = _configs(hf, "static_zerouni", "all")
    rng = np.random.default_rng(3)
    samples = [SampleSpec(_chat(rng), [(700, 330)])]
    mparams = init_manager_params(settings, cfg.text.hidden_size, seed=0, nonzero=True)
    case = build_case(cfg, samples, im_start_id=IMS)
    inputs = jax.tree.map(jnp.asarray, case.batch.to_model_inputs())
    with_mgr = np.asarray(jax_model_from_torch(cfg, hf, mparams)(inputs))
    zero = {k: (v * 0 if "layer_scores" in k else v) for k, v in mparams.items()}
    without = np.asarray(jax_model_from_torch(cfg, hf, zero)(inputs))
    assert relative_error(with_mgr, without, case.valid) > 1e-3


@pytest.mark.parametrize("manager_type", [None, "static_zerouni"], ids=["baseline", "manager"])
def test_square_no_grid_checkpoints(hf, manager_type):
    """The flat / square checkpoints: 729 tokens per image, no newline, no image_newline tensor."""
    cfg, settings = _configs(hf, manager_type, "all", grid=False)
    rng = np.random.default_rng(4)
    err, case = _parity(hf, cfg, settings, [SampleSpec(_chat(rng), [(600, 450)])])
    assert case.batch.plan_dst.shape[0] == 729
    print(f"PARITY square/flat {manager_type or 'baseline'}: {err:.2e}")
    assert err <= TOL, err


@pytest.mark.parametrize("grid_type", ["all", "grid"])  # several images: no 729 offset for "grid"
@pytest.mark.parametrize("manager_type", ["static_zerouni", "adaptive_average_zerouni"])
def test_multi_image_pad_sample(hf, manager_type, grid_type):
    cfg, settings = _configs(hf, manager_type, grid_type)
    rng = np.random.default_rng(5)
    err, case = _parity(hf, cfg, settings, [SampleSpec(_chat(rng, n_images=2), [(500, 300), (256, 700)])])
    assert case.batch.plan_dst.shape[0] == 2 * 729  # pad mode, original convention: no newline
    print(f"PARITY manager multi-image pad {manager_type} {grid_type}: {err:.2e}")
    assert err <= TOL, err


def test_batch_with_text_only_row(hf):
    cfg, settings = _configs(hf, "static_zerouni", "all")
    rng = np.random.default_rng(6)
    text_only = [IMS] + [int(v) for v in rng.integers(1, 400, 30)] + [IME, NL]
    err, _ = _parity(hf, cfg, settings, [SampleSpec(_chat(rng), [(400, 500)]), SampleSpec(text_only)])
    print(f"PARITY manager image + text-only batch: {err:.2e}")
    assert err <= TOL, err


def test_truncation_after_expansion(hf):
    """The sequence is cut after image expansion, inside the image: the Manager update is clipped."""
    cfg, settings = _configs(hf, "static_zerouni", "all")
    rng = np.random.default_rng(7)
    ids = [int(v) for v in rng.integers(1, 400, 10)] + [IMG] + [int(v) for v in rng.integers(1, 400, 10)]
    settings.model_max_length = 1000
    err, case = _parity(hf, cfg, settings, [SampleSpec(ids, [(700, 330)])], seq_len=1000)
    assert (case.batch.plan_dst == case.batch.input_ids.size).any()  # tokens past the cut are dropped
    assert err <= TOL, err


@pytest.mark.parametrize("mode", ["anyres_max_9", "anyres"])
@pytest.mark.parametrize("grid_type", ["all", "main"])
def test_flat_merge_with_anyres_tiling(hf, mode, grid_type):
    """mm_patch_merge_type "flat" with anyres tiling (llava_arch.py's flat branch): every crop's 729
    tokens in crop order, base first, no unpad, no newline, no max_N resize; the Manager features
    are flattened the same way, so every token gets the update whatever the grid type."""
    cfg, settings = _configs(hf, "static_zerouni", grid_type)
    cfg = cfg.replace(image=ImageConfig(aspect_ratio=mode, grid_pinpoints=cfg.image.grid_pinpoints,
                                        patch_merge_type="flat", convention="original"))
    settings = dataclasses.replace(settings, image_aspect_ratio=mode, merge_type="flat")
    rng = np.random.default_rng(6)
    err, case = _parity(hf, cfg, settings, [SampleSpec(_chat(rng), [(700, 330)])])
    tokens = case.batch.plan_dst.shape[0]
    assert tokens > 729 and tokens % 729 == 0 and case.batch.plan_manager.all()
    print(f"PARITY flat {mode} {grid_type}: {err:.2e}")
    assert err <= TOL, err
