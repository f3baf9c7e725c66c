"""Analytic FLOPs: parameter counts against the real parameter trees, formula against the reference."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from manager_jax.config import preset
from manager_jax.train import flops
from manager_jax.train.state import model_abstract


def count(tree, top):
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree[top])))


@pytest.mark.parametrize("size", ["0.5b", "7b"])
def test_parameter_counts_match_the_model(size):
    cfg = preset(size, "grid_manager")
    _, params = model_abstract(cfg)
    assert flops.vision_params(cfg) == count(params, "vision")
    # The reference counts the HF language model (embedding + layers + norm); with an untied head
    # it subtracts the embedding and adds the head matmul: both are V x D.
    assert flops.llm_params(cfg) == count(params, "text")


def test_reference_formula_for_the_benchmark_workload():
    """ref_torch_llava_ov.py train_flops, transcribed: B * (vit + llm) for 5 crops and seq 4,099."""
    cfg = preset("0.5b", "grid")
    n_vit, n_llm = flops.vision_params(cfg), flops.llm_params(cfg)
    b, crops, seq = 2, 5, 4099
    v, t = cfg.vision, cfg.text
    vit = 6 * n_vit * 729 * crops + 12 * v.num_layers * 729**2 * v.hidden_size * crops
    llm = 6 * n_llm * seq + 12 * t.num_layers * seq**2 * t.hidden_size / 2
    assert flops.reference_train_flops(cfg, batch=b, crops_per_sample=crops, seq=seq) == pytest.approx(b * (vit + llm))


def test_frozen_parts_do_less_work():
    cfg = preset("0.5b", "manager")
    kw = dict(crops=1, tokens=800, sum_sq_lengths=800.0**2)
    everything = flops.train_flops(cfg, **kw)
    stage1 = flops.train_flops(cfg, trainable=frozenset({"projector", "manager"}), **kw)
    # Stage 1: tower forward only (2 of 6 passes), LLM forward + activation gradients (4 of 6).
    vit_part = flops.vision_params(cfg) * 729 + 2 * cfg.vision.num_layers * 729**2 * cfg.vision.hidden_size
    llm_part = flops.llm_params(cfg) * 800 + 2 * cfg.text.num_layers * 800**2 * cfg.text.hidden_size / 2
    assert everything == pytest.approx(6 * vit_part + 6 * llm_part)
    assert stage1 == pytest.approx(2 * vit_part + 4 * llm_part)


def test_peak_table():
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert flops.peak_tflops("TPU v5 lite") == 197.0 and flops.peak_tflops("TPU v5") == 459.0
    assert flops.peak_tflops("cpu") is None
