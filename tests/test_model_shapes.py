"""The real 0.5B configuration, built abstractly: every parameter shape and the parameter count
against a transformers model of the same config (built on the meta device), plus the Manager."""

import numpy as np
import pytest
import torch
from flax import nnx
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

from manager_jax import config as C
from manager_jax.models.llava_ov import LlavaOV
from tools.convert_weights import mapping


def _hf_0_5b_config() -> LlavaOnevisionConfig:
    """The public llava-onevision-qwen2-0.5b-si shapes (SPEC §1), written out, not derived from ours."""
    return LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                           num_hidden_layers=26, num_attention_heads=16, image_size=384, patch_size=14,
                           vision_use_head=False),
        text_config=dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         tie_word_embeddings=True),
        tie_word_embeddings=True, vision_feature_layer=-1, vision_feature_select_strategy="full",
    )


@pytest.fixture(scope="module")
def hf_shapes():
    with torch.device("meta"):
        hf = LlavaOnevisionForConditionalGeneration(_hf_0_5b_config())
    shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    shapes.pop("lm_head.weight")  # tied to the embedding (absent from the checkpoints, SPEC §1.4)
    return shapes


def _ours(cfg):
    model = nnx.eval_shape(lambda: LlavaOV(cfg, rngs=nnx.Rngs(0)))
    return {p: tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("variant", ["grid", "grid_manager"])
def test_0_5b_shapes_match_transformers(hf_shapes, variant):
    cfg = C.preset("0.5b", variant)
    ours = _ours(cfg)
    specs = mapping.param_specs(cfg)
    assert {s.path for s in specs} == set(ours)  # the table covers exactly our tree
    seen = set()
    for spec in specs:
        assert ours[spec.path] == spec.shape, spec.path
        for t in mapping.tensor_specs(spec):
            key = mapping.to_layout(t.key, "hf_memory")
            if key.startswith("model.manager"):
                continue  # no transformers counterpart
            assert hf_shapes[key] == t.torch_shape, (key, spec.path)
            seen.add(key)
    assert seen == set(hf_shapes)  # nothing of transformers is missing on our side

    hf_count = sum(int(np.prod(s)) for s in hf_shapes.values())
    our_count = sum(int(np.prod(s)) for s in ours.values())
    manager = sum(int(np.prod(s)) for p, s in ours.items() if p[0] == "manager")
    assert our_count - manager == hf_count
    assert manager == (80_640 if variant == "grid_manager" else 0)  # SPEC §2.2
    print(f"0.5B {variant}: {our_count:,} parameters ({manager:,} in the Manager)")
