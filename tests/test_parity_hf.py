"""Parity with transformers LlavaOnevisionForConditionalGeneration (random weights, fp32, CPU).

Per module (SigLIP layer, tower, projector, Qwen2 layer, decoder) and full logits for anyres_max_9
images of several sizes, a multi-image pad sample and a batch mixing an image and a text-only
sample. Relative error ||jax - torch|| / ||torch|| <= 1e-5.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from manager_jax.config import ModelConfig
from manager_jax.data.conversation import IMAGE_TOKEN_INDEX as IMG
from manager_jax.reference.hf_tiny import tiny_hf_config, tiny_hf_model
from manager_jax.reference.parity import SampleSpec, build_case, jax_model_from_torch, relative_error

TOL = 1e-5


@pytest.fixture(scope="module")
def models():
    hf_cfg = tiny_hf_config(vision_layers=3, text_layers=3)
    hf = tiny_hf_model(hf_cfg, seed=0, attn_implementation="sdpa")
    cfg = ModelConfig.from_hf_config(hf_cfg.to_dict())
    return hf, cfg, jax_model_from_torch(cfg, hf)


def _layer(stacked, i):
    graphdef, state = nnx.split(stacked)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))


def _t(x):
    return torch.from_numpy(np.asarray(x))


def test_config_from_hf(models):
    hf, cfg, _ = models
    assert cfg.text.num_layers == 3 and cfg.vision.num_layers == 3
    assert cfg.image.convention == "hf" and cfg.image.aspect_ratio == "anyres_max_9"
    assert cfg.image_token_id == hf.config.image_token_id


def test_siglip_layer_and_tower_and_projector(models):
    hf, cfg, ours = models
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 729, cfg.vision.hidden_size)).astype(np.float32)
    with torch.no_grad():
        ref = hf.model.vision_tower.encoder.layers[1](_t(x), attention_mask=None)
        ref = ref[0] if isinstance(ref, tuple) else ref
    assert relative_error(_layer(ours.vision.layers, 1)(jnp.asarray(x)), ref.numpy()) <= TOL

    pixels = rng.normal(size=(2, 384, 384, 3)).astype(np.float32)
    with torch.no_grad():
        out = hf.model.vision_tower(_t(pixels.transpose(0, 3, 1, 2)), output_hidden_states=True)
    last, selected = ours.vision(jnp.asarray(pixels), [0, 1, 3])
    assert relative_error(last, out.hidden_states[-1].numpy()) <= TOL
    for got, k in zip(selected, [0, 1, 3]):
        assert relative_error(got, out.hidden_states[k].numpy()) <= TOL

    with torch.no_grad():
        proj = hf.model.multi_modal_projector(out.hidden_states[-1])
    assert relative_error(ours.projector(last), proj.numpy()) <= TOL


def test_qwen2_layer_and_decoder(models):
    hf, cfg, ours = models
    rng = np.random.default_rng(1)
    b, t, d = 2, 37, cfg.text.hidden_size
    x = rng.normal(size=(b, t, d)).astype(np.float32)
    pos = np.tile(np.arange(t), (b, 1))
    lm = hf.model.language_model
    with torch.no_grad():
        cos_sin = lm.rotary_emb(_t(x), _t(pos))
        causal = torch.full((1, 1, t, t), float("-inf")).triu(1)
        ref = lm.layers[2](_t(x), attention_mask=causal, position_embeddings=cos_sin, position_ids=_t(pos))
        ref = ref[0] if isinstance(ref, tuple) else ref
    seg = jnp.ones((b, t), jnp.int32)
    ctx = ours.text.context(jnp.asarray(pos), seg)
    got, _ = _layer(ours.text.layers, 2)(jnp.asarray(x), ctx)
    assert relative_error(got, ref.numpy()) <= TOL

    # Full decoder with right padding in row 1.
    mask = np.ones((b, t), np.int64)
    mask[1, 30:] = 0
    with torch.no_grad():
        ref = lm(inputs_embeds=_t(x), attention_mask=_t(mask)).last_hidden_state.numpy()
    ctx = ours.text.context(jnp.asarray(pos), jnp.asarray(mask.astype(np.int32)))
    got, _ = ours.text(jnp.asarray(x), ctx)
    assert relative_error(got, ref, mask.astype(bool)) <= TOL


def _text(rng, n):
    return [int(v) for v in rng.integers(1, 400, n)]


def _logits_parity(hf, cfg, ours, samples, seed=0):
    case = build_case(cfg, samples, seed=seed)
    inputs = {k: _t(v) for k, v in case.hf_inputs.items() if k != "labels"}
    with torch.no_grad():
        ref = hf(**inputs, batch_num_images=_t(np.asarray(case.batch_num_images))).logits.numpy()
    got = np.asarray(ours(jax.tree.map(jnp.asarray, case.batch.to_model_inputs())))
    return relative_error(got, ref, case.valid), case


ANYRES_SIZES = [
    (384, 384),  # 1x1 grid
    (640, 480),  # 2x2, unpad rows
    pytest.param((1647, 1281), marks=pytest.mark.slow),  # SPEC rounding example (7261 tokens, HF)
    (1920, 1080),  # max_9 downsampling fires
    (333, 1000),  # tall, odd unpad remainder in the columns
]


@pytest.mark.parametrize("size", ANYRES_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_logits_anyres_max_9(models, size):
    hf, cfg, ours = models
    rng = np.random.default_rng(size[0])
    err, case = _logits_parity(hf, cfg, ours, [SampleSpec(_text(rng, 5) + [IMG] + _text(rng, 9), [size])])
    assert case.batch.plan_weight[:, 1:].any() == (size == (1920, 1080) or size == (1647, 1281))
    print(f"PARITY hf anyres_max_9 {size[0]}x{size[1]}: {err:.2e}")
    assert err <= TOL, err


def test_logits_multi_image_pad(models):
    hf, cfg, ours = models
    rng = np.random.default_rng(7)
    ids = _text(rng, 4) + [IMG] + _text(rng, 3) + [IMG] + _text(rng, 6)
    err, case = _logits_parity(hf, cfg, ours, [SampleSpec(ids, [(500, 300), (256, 700)])])
    assert case.batch.crop_mask.sum() == 2  # one padded crop per image
    print(f"PARITY hf multi-image pad: {err:.2e}")
    assert err <= TOL, err


def test_logits_image_and_text_only_batch(models):
    hf, cfg, ours = models
    rng = np.random.default_rng(8)
    samples = [SampleSpec(_text(rng, 6) + [IMG] + _text(rng, 12), [(500, 400)]), SampleSpec(_text(rng, 40))]
    err, case = _logits_parity(hf, cfg, ours, samples)
    assert (case.batch.segment_ids[1] == 0).any()  # the text-only row is padded
    print(f"PARITY hf image + text-only batch: {err:.2e}")
    assert err <= TOL, err


@pytest.mark.parametrize("declared, feature_layer", [(4, -2), (4, -1), (4, 3)])
def test_logits_follow_vision_feature_layer(declared, feature_layer):
    """transformers takes hidden_states[vision_feature_layer] of the tower its config declares; we
    run that many layers. A 27-layer config with -1 uses all 27 (our reading dropped the last)."""
    hf_cfg = tiny_hf_config(vision_layers=declared, text_layers=2)
    hf_cfg.vision_feature_layer = feature_layer
    hf = tiny_hf_model(hf_cfg, seed=3, attn_implementation="sdpa")
    cfg = ModelConfig.from_hf_config(hf_cfg.to_dict())
    rng = np.random.default_rng(11)
    err, _ = _logits_parity(hf, cfg, jax_model_from_torch(cfg, hf), [SampleSpec(_text(rng, 4) + [IMG] + _text(rng, 5),
                                                                                 [(500, 400)])])
    assert err <= TOL, (declared, feature_layer, cfg.vision.num_layers, err)


@pytest.mark.parametrize("theta", [1e4, 1e6])
def test_rope_beyond_32k_positions_and_packing_restarts(theta):
    """cos/sin against transformers' Qwen2 rotary embedding at positions past
    max_position_embeddings (up to 1M) and restarting at 0 as packed rows do. bf16 is identical;
    fp32 is within a rounding of cos/sin plus what one ulp of an inverse frequency makes at that
    position (jnp and torch's fp32 pow differ by one ulp in one frequency at head_dim 128, theta 1e6)."""
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    from manager_jax.models.qwen2 import rope_cos_sin

    hf_cfg = Qwen2Config(hidden_size=128, num_attention_heads=1, max_position_embeddings=32768,
                         rope_parameters={"rope_type": "default", "rope_theta": theta})
    rotary = Qwen2RotaryEmbedding(hf_cfg)
    pos = np.concatenate([np.arange(40), np.arange(7), [32767, 32768, 40000, 131071, 500000, 1_000_000]])[None]
    for dtype in (torch.float32, torch.bfloat16):
        with torch.no_grad():
            cos, sin = rotary(torch.zeros(1, 1, 128, dtype=dtype), _t(pos.astype(np.int64)))
        ours = rope_cos_sin(jnp.asarray(pos, jnp.int32), 128, theta, jnp.dtype(str(dtype).split(".")[1]))
        inv_freq = np.concatenate([rotary.inv_freq.numpy()] * 2)
        bound = 6e-8 + pos[..., None] * inv_freq * 2.0**-23 if dtype == torch.float32 else 0.0
        for got, ref in zip(ours, (cos, sin)):
            assert (np.abs(np.asarray(got, np.float32) - ref.float().numpy()) <= bound).all()
