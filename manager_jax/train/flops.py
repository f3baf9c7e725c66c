"""Analytic model FLOPs and MFU.

The formula is the one of the PyTorch reference benchmark (../shared/bench/ref_torch_llava_ov.py,
`train_flops`), so MFU numbers are comparable: per sample, 6·N·T for the weight matmuls plus the
attention score/value matmuls, 12·L·T²·D, non-causal for the ViT and halved (causal) for the LLM.
N_vit counts the vision tower; N_llm the decoder without the embedding table plus one V·D matrix
for the LM head. Projector and Manager are not counted (as in the reference).

Training with frozen parts does less work than 6·N·T. `train_flops(..., trainable=...)` counts
forward (2), activation gradients (2, where anything upstream trains) and weight gradients (2, where
the part itself trains); with everything trainable it equals the reference formula.
"""

from __future__ import annotations

from manager_jax.config import ModelConfig
from manager_jax.train.optimizer import GROUPS

PATCHES = 729

# Dense bf16 peak per chip (TFLOP/s), by `device_kind` substring; MFU is None elsewhere (CPU).
PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("TPU v6", 918.0),
    ("TPU v5p", 459.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0),
    ("TPU v5", 459.0),
    ("TPU v4", 275.0),
)


def peak_tflops(device_kind: str) -> float | None:
    for key, value in PEAK_TFLOPS:
        if key.lower() in device_kind.lower():
            return value
    return None


def vision_params(cfg: ModelConfig) -> int:
    """Parameters of the SigLIP tower (patch embed, positions, layers, post-LN)."""
    v = cfg.vision
    d, i, p = v.hidden_size, v.intermediate_size, v.patch_size
    layer = 4 * (d * d + d) + (d * i + i) + (i * d + d) + 4 * d
    return (p * p * 3 * d + d) + v.num_patches * d + v.num_layers * layer + 2 * d


def llm_params(cfg: ModelConfig) -> int:
    """Decoder parameters without the embedding table, plus the LM-head matmul (V·D)."""
    t = cfg.text
    d, hd = t.hidden_size, t.head_dim
    q, kv = t.num_heads * hd, t.num_kv_heads * hd
    attn = d * q + q + 2 * (d * kv + kv) + q * d
    mlp = 3 * d * t.intermediate_size
    layer = attn + mlp + 2 * d
    return t.num_layers * layer + d + t.vocab_size * d


def _passes(trains_self: bool, trains_upstream: bool) -> int:
    """2 per matmul pass: forward, activation gradient, weight gradient."""
    return 2 + (2 if (trains_self or trains_upstream) else 0) + (2 if trains_self else 0)


def train_flops(
    cfg: ModelConfig,
    *,
    crops: float,
    tokens: float,
    sum_sq_lengths: float,
    trainable: frozenset[str] | None = None,
) -> float:
    """Model FLOPs of one training pass over `crops` real crops and `tokens` text positions.

    Attention is counted per sample (packed segment): `sum_sq_lengths` is the sum of the squared
    segment lengths. `trainable`: our group names (optimizer.GROUPS); None = everything.
    """
    groups = frozenset(GROUPS) if trainable is None else trainable
    v, t = cfg.vision, cfg.text
    vit_pass = _passes("vision_tower" in groups, False)
    # Gradients reach the tower's activations only when the tower itself trains.
    llm_pass = _passes("language_model" in groups, bool(groups - {"language_model"}) or "language_model" in groups)
    vit_tokens = PATCHES * crops
    vit = vit_pass * vision_params(cfg) * vit_tokens + 2 * vit_pass * v.num_layers * PATCHES**2 * v.hidden_size * crops
    attn = 2 * llm_pass * t.num_layers * float(sum_sq_lengths) * t.hidden_size / 2
    llm = llm_pass * llm_params(cfg) * tokens + attn
    return float(vit + llm)


def reference_train_flops(cfg: ModelConfig, *, batch: int, crops_per_sample: int, seq: int) -> float:
    """Exactly the reference's `train_flops` (every parameter trainable, one segment per sample)."""
    return batch * train_flops(cfg, crops=crops_per_sample, tokens=seq, sum_sq_lengths=float(seq) ** 2)
