"""The original's AdamW parameter groups in PyTorch (SPEC §2.8), for parity tests of our optimizer.

`LLaVATrainer.create_optimizer` (LLaVA-NeXT/llava/train/llava_trainer.py) splits the trainable
parameters by name: one group per keyword with its own LR (`mm_projector_lr` -> "mm_projector",
`mm_manager_lr` -> "manager", `mm_vision_tower_lr` -> "vision_tower"), the rest at the base LR,
and each of these into decayed and not decayed. Not decayed: parameters of `ALL_LAYERNORM_LAYERS`
modules (transformers 4.40: `nn.LayerNorm` only, so Qwen2's RMSNorm weights decay) and names
containing "bias".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch


def layer_norm_param_names(model: torch.nn.Module) -> set[str]:
    """Names of the parameters that belong to `nn.LayerNorm` modules of `model`."""
    return {
        f"{module_name}.{name}" if module_name else name
        for module_name, module in model.named_modules()
        if isinstance(module, torch.nn.LayerNorm)
        for name, _ in module.named_parameters(recurse=False)
    }


def original_param_groups(
    named_params: Iterable[tuple[str, torch.nn.Parameter]],
    layer_norm_names: set[str],
    lr_by_keyword: Mapping[str, float],
    weight_decay: float,
) -> list[dict]:
    """torch.optim param groups as create_optimizer builds them; frozen parameters are left out.

    `lr_by_keyword` maps a name substring to its LR (the original's keywords are "mm_projector",
    "manager" and "vision_tower"; an HF-named model spells the projector "multi_modal_projector").
    Groups without "lr" take the optimizer's base LR. Every group carries a "name": the keyword, or
    "base" for the rest. Empty groups are dropped.
    """
    named = [(n, p) for n, p in named_params if p.requires_grad]
    keyword_of = {n: next((k for k in lr_by_keyword if k in n), None) for n, _ in named}
    groups = []
    for keyword in (None, *lr_by_keyword):
        for decay in (True, False):
            params = [p for n, p in named if keyword_of[n] == keyword
                      and (n not in layer_norm_names and "bias" not in n) == decay]
            if not params:
                continue
            group = {"params": params, "weight_decay": weight_decay if decay else 0.0, "name": keyword or "base"}
            if keyword is not None:
                group["lr"] = lr_by_keyword[keyword]
            groups.append(group)
    return groups
