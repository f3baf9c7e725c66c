"""The original training recipes (SPEC §2.8): 3 stages x 4 variants x 3 sizes, from one table.

    python run.py train --config configs/llava_ov.py:stage2_grid_manager_0.5b
    python run.py train --config configs/llava_ov.py --set recipe=stage1_manager_7b --set data.data_path=...
    python run.py compile --config configs/llava_ov.py:stage2_grid_manager_7b --topology v5p:2x2x2

Recipe names: ``stage{1,1.5,2}_{baseline,manager,grid,grid_manager}_{0.5b,7b,72b}``.

What mirrors the scripts (LLaVA-NeXT/scripts/manager/main/*.sh): prompt template, data, image mode
(square/flat for stage 1 and the no-grid variants; anyres with 5 pinpoints in stage 1.5 and
anyres_max_9 with the 36 pinpoints in stage 2 for the grid variants), ``mm_tunable_parts``, the
learning rates as applied, max length, 512 samples per optimizer step (one sample per row, no
packing, like the original collator), the record order of ``--group_by_modality_length`` in stages
1.5 and 2 (each step from one modality, shard batches of similar length), AdamW / cosine / warmup 0.03 / clip 1.0, bf16 compute with
fp32 master weights, full rematerialisation (gradient checkpointing).

Caveats:
- Stage 1.5 / 2 train every part at 1e-5, as the original did: its scripts pass per-module LRs
  (tower 2e-6, manager 5e-5), but their DeepSpeed config's optimizer section makes one parameter
  group of everything (SPEC §2.8; traced through transformers 4.40, accelerate 0.29.3 and
  DeepSpeed 0.14.4). The LRs are kept in the config; ``--set optim.per_group_lr=True`` applies them.
- ``num_steps`` for stages 1.5 / 2 depends on your copy of the mixtures: set it (one epoch =
  records // 512: HF Trainer's optimizer steps per epoch are the dataloader's full accumulation
  rounds, and it stops there). Stage 1 uses the 558,128 LLaVA-Pretrain records: 1,090 steps.
- Data and initial-weight paths are placeholders under ``data/`` and ``checkpoints/``; override them.
- On 16 GiB chips (TPU v5e) the 0.5B stage-2 grid + Manager step compiles for ``v5e:4x4`` at
  14.5 GiB per chip (libtpu's peak, of 15.75 usable; ``run.py compile``; not yet run on a v5e).
  For more headroom, one row per shard batch with its crop and image-token room cut to one row's:
  ``--set data.rows_per_host=1 --set data.max_crops=37 --set data.max_image_tokens=16384``
  (what ``run.py compile`` suggests for a step that does not fit).

Speed options that leave the loss unchanged (not set here, so a recipe compiles one step):
- ``--set loss_token_budget=N`` sends at most N supervised positions per shard batch through the
  LM head instead of every position. A batch over the budget runs a second, full step, and is
  logged. On the 0.5B benchmark this removes about 7.8 of 48 TFLOP per step.
- ``--set model.remat_policy=dots`` keeps the weight matmuls' and attention kernels' outputs
  instead of recomputing the layer. This is faster where it fits (0.5B on one H100: 0.187 s
  against 0.212 s without remat). It needs more memory than ``full``: check it with
  ``run.py compile``.
"""

from __future__ import annotations

import dataclasses

from manager_jax.config import ANYRES_MAX_9_PINPOINTS, STAGE_1_5_PINPOINTS, preset
from manager_jax.data.pipeline import DataConfig
from manager_jax.sharding import MeshConfig
from manager_jax.train.optimizer import OptimConfig
from manager_jax.train.recipe import CheckpointConfig, RecipeError, TrainConfig

STAGES = ("1", "1.5", "2")
VARIANTS = ("baseline", "manager", "grid", "grid_manager")
SIZES = ("0.5b", "7b", "72b")
GLOBAL_BATCH = 512
MAX_CROPS_PER_IMAGE = {"square": 1, "anyres": 5, "anyres_max_9": 37}  # base crop + tiles

# One row per stage (SPEC §2.8 table).
STAGE_TABLE = {
    "1": dict(
        template="plain", data_path="data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json",
        image_folder="data/LLaVA-Pretrain/images", mixture=None, grid_mode=None,
        tunable="mm_mlp_adapter", lr=1e-3, tower_lr=None, manager_lr=1e-3, max_len=8192,
        # Rows are padded to a fixed length: 729 image tokens + a short caption always fit in 2048
        # (a longer sample is skipped and counted, never cut), which saves 4x over 8192.
        row_len=2048, num_steps=558_128 // GLOBAL_BATCH,
    ),
    "1.5": dict(
        template="qwen_1_5", data_path=None, image_folder=None, mixture="data/stage1.5.yaml",
        grid_mode=("anyres", STAGE_1_5_PINPOINTS), tunable="mm_vision_tower,mm_mlp_adapter,mm_language_model",
        lr=1e-5, tower_lr=2e-6, manager_lr=5e-5, max_len=16384, row_len=16384, num_steps=8000,
    ),
    "2": dict(
        template="qwen_1_5", data_path=None, image_folder=None, mixture="data/stage2.yaml",
        grid_mode=("anyres_max_9", ANYRES_MAX_9_PINPOINTS), tunable="mm_vision_tower,mm_mlp_adapter,mm_language_model",
        lr=1e-5, tower_lr=2e-6, manager_lr=5e-5, max_len=16384, row_len=16384, num_steps=6500,
    ),
}

# Per size: rows per shard batch (stage 1, later stages) and mesh.
SIZE_TABLE = {
    "0.5b": dict(rows=(16, 2), mesh=MeshConfig(data=1, fsdp=-1, tensor=1)),
    "7b": dict(rows=(8, 1), mesh=MeshConfig(data=1, fsdp=-1, tensor=1)),
    "72b": dict(rows=(4, 1), mesh=MeshConfig(data=1, fsdp=-1, tensor=8)),
}


def recipe_names() -> list[str]:
    return [f"stage{s}_{v}_{z}" for s in STAGES for v in VARIANTS for z in SIZES]


def parse_name(name: str) -> tuple[str, str, str]:
    """'stage2_grid_manager_0.5b' -> ('2', 'grid_manager', '0.5b')."""
    if not name.startswith("stage"):
        raise RecipeError(f"recipe {name!r}: expected stage<1|1.5|2>_<variant>_<size>; e.g. {recipe_names()[0]}")
    stage, rest = name[len("stage"):].split("_", 1)
    variant, _, size = rest.rpartition("_")
    if stage not in STAGES or variant not in VARIANTS or size not in SIZES:
        raise RecipeError(
            f"unknown recipe {name!r}: stages {STAGES}, variants {VARIANTS}, sizes {SIZES} "
            f"(e.g. stage2_grid_manager_0.5b)"
        )
    return stage, variant, size


def _init_from(stage: str, variant: str, size: str) -> str:
    base = f"checkpoints/qwen2_siglip_{size}"  # Qwen2-Instruct + SigLIP converted by tools.convert_weights
    if stage == "1":
        return base
    stage1_variant = "manager" if variant.endswith("manager") else "baseline"
    if stage == "1.5":
        # stage1.5.sh: Qwen2 + --pretrain_mm_mlp_adapter; the manager scripts start from the stage-1 checkpoint.
        return f"{base},runs/stage1_{stage1_variant}_{size}/checkpoints"
    return f"runs/stage1.5_{variant}_{size}/checkpoints"


def get_config(recipe: str = "stage2_grid_manager_0.5b") -> TrainConfig:
    """The run config of one recipe of the table."""
    stage, variant, size = parse_name(recipe)
    row, sizes = STAGE_TABLE[stage], SIZE_TABLE[size]
    manager = variant.endswith("manager")
    grid = variant.startswith("grid") and row["grid_mode"] is not None
    # Stage 1 of every variant is square/flat (stage1.sh / stage1_manager.sh use the defaults).
    if grid:
        mode, pinpoints = row["grid_mode"]
        model = preset(size, "grid_manager" if manager else "grid")
        model.image = dataclasses.replace(model.image, aspect_ratio=mode, grid_pinpoints=pinpoints)
    else:
        model = preset(size, "manager" if manager else "baseline")
    model = model.replace(dtype="bfloat16", param_dtype="float32", scan_layers=True, remat_policy="full")
    rows = sizes["rows"][0 if stage == "1" else 1]
    image_mode = row["grid_mode"][0] if grid else "square"
    tunable = row["tunable"] + (",mm_manager" if manager else "")
    seq_len = row["row_len"]
    data = DataConfig(
        data_path=row["data_path"], image_folder=row["image_folder"], mixture=row["mixture"],
        template=row["template"], rows_per_host=rows, seq_len=seq_len,
        max_crops=rows * MAX_CROPS_PER_IMAGE[image_mode], max_image_tokens=rows * seq_len,
        pack=False,  # one sample per row, right-padded, as the original collator
        too_long="truncate" if seq_len == row["max_len"] else "skip",  # the original cuts at max_len
        num_epochs=None, shuffle=True, seed=0, worker_count=4,
        group_by_modality_length=stage != "1",  # the stage 1.5 / 2 scripts' --group_by_modality_length True
    )
    return TrainConfig(
        name=recipe,
        output_dir=f"runs/{recipe}",
        model=model,
        data=data,
        optim=OptimConfig(
            lr=row["lr"], vision_tower_lr=row["tower_lr"], manager_lr=row["manager_lr"] if manager else None,
            # Stages 1.5 / 2 ran their DeepSpeed config's one optimizer group: every part at lr
            # (SPEC §2.8; the per-module lrs are recorded, and applied with optim.per_group_lr=True).
            per_group_lr=stage == "1",
            warmup_ratio=0.03, schedule="cosine", max_grad_norm=1.0, weight_decay=0.0,
        ),
        mesh=dataclasses.replace(sizes["mesh"]),
        checkpoint=CheckpointConfig(every_steps=100, keep=3),  # save_steps 100 in the scripts
        tunable_parts=tunable,
        num_steps=row["num_steps"],
        global_batch_size=GLOBAL_BATCH,
        batch_shards=-1,
        grad_accum=-1,  # derived: 512 rows / (shards x rows per shard)
        init_from=_init_from(stage, variant, size),
        loss_normalization="shard_mean",
        loss_chunk_size=4096,
    )
