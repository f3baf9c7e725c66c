"""Recipe files, `--set` overrides and the table of original recipes (SPEC §2.8)."""

from __future__ import annotations

import os
import re

import pytest

from manager_jax.config import ANYRES_MAX_9_PINPOINTS, STAGE_1_5_PINPOINTS
from manager_jax.train.recipe import (RecipeError, TrainConfig, check_inputs, compare_with_saved, load_recipe,
                                     resolve_batch_layout)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "demo.py")
LLAVA_OV = os.path.join(REPO, "configs", "llava_ov.py")


def test_demo_recipe_and_overrides():
    cfg = load_recipe(DEMO, ["output_dir=/tmp/x", "optim.lr=3e-4", "model.text.num_layers=2", "data.seq_len=900",
                             "logging.wandb=true", "init_from=None", "synthetic_image_sizes=[(64, 48)]"])
    assert cfg.output_dir == "/tmp/x" and cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.model.text.num_layers == 2 and cfg.data.seq_len == 900 and cfg.logging.wandb is True
    assert cfg.init_from is None and cfg.synthetic_image_sizes == [(64, 48)]
    assert cfg.checkpoint_dir() == os.path.join("/tmp/x", "checkpoints")


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "has no field 'lrr'"),
        ("optim=3", "is a section"),
        ("num_steps=abc", r"num_steps='abc': expected int$"),  # the type as written, not <class 'int'>
        ("data.max_skip_fraction=abc", r"expected float \| None$"),
        ("model.text.num_heads=5", "multiple of"),  # re-validated by ModelConfig
        ("tunable_parts=mm_everything", "unknown mm_tunable_parts"),
        ("data.seq_len=0", "seq_len must be >= 1"),
        ("no_equals_sign", "key=value"),
        ("logging.every_steps=0", "logging.every_steps must be >= 1"),
        ("checkpoint.every_steps=-5", "checkpoint.every_steps must be >= 0"),
        ("global_batch_size=0", "global_batch_size must be >= 1 or -1"),
        ("data.data_path=/x.json", "data.mixture=None"),  # with the recipe's mixture below
        ("output_dir=gs://bucket/run", "output_dir=gs://bucket/run is a URL.*mount the bucket"),
        ("checkpoint.dir=s3://bucket/ckpt", "checkpoint.dir=s3://bucket/ckpt is a URL"),
        # These used to start the run and fail in it (NaN weights, a traceback, files left behind).
        ("optim.lr=1e999", r"optim.lr must be a finite number >= 0, got inf"),
        ("optim.max_grad_norm=1e999", r"optim.max_grad_norm must be a finite number"),
        ("data.template=nope", r"template 'nope' not in \('plain', 'qwen_1_5'\)"),
        ("model.dtype=float64x", r"dtype 'float64x' not in"),
        ("model.text.head_dim=0", r"text.head_dim must be >= 1, got 0"),
        ("loss_token_budget=-3", r"loss_token_budget must be >= 0"),
        ("synthetic_image_sizes=5", r"synthetic_image_sizes must be a list of \(width, height\) pairs"),
        ("synthetic_records=-5", r"synthetic_records must be >= 1, or None"),
        ("stop_at_step=0", r"stop_at_step must be >= 1 or None, got 0"),
        ("peak_tflops_per_device=0", r"peak_tflops_per_device must be a number > 0"),
        ("output_dir=[1]", r"output_dir=\[1\]: expected str"),
        ('data.data_path=["a.json"]', r"expected str \| None"),
    ],
)
def test_bad_overrides_fail_with_clear_messages(override, message):
    with pytest.raises((RecipeError, ValueError), match=message):  # ConfigError for the model
        load_recipe(DEMO, [override, *(["data.mixture=m.yaml"] if override.startswith("data.data_path") else [])])


def test_a_string_field_takes_the_override_as_written():
    cfg = load_recipe(DEMO, ["name=1e3", "output_dir=0x1F", "data.image_folder=1_000"])
    assert (cfg.name, cfg.output_dir, cfg.data.image_folder) == ("1e3", "0x1F", "1_000")
    assert load_recipe(DEMO, ["optim.lr=1e-3"]).optim.lr == 1e-3  # numbers stay numbers


def test_a_recipe_file_that_fails_is_a_recipe_error(tmp_path):
    """A recipe is Python: its SyntaxError, ImportError or exception is bad input (one line, exit 2)."""
    cases = {
        "syntax": ("def get_config(:\n    pass\n", "SyntaxError"),
        "import": ("import no_such_module_here\n", "ModuleNotFoundError: No module named 'no_such_module_here'"),
        "raises": ("def get_config():\n    raise KeyError('stage9')\n", "KeyError: 'stage9'"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / f"{name}.py"
        path.write_text(text)
        with pytest.raises(RecipeError, match=re.escape(message)):
            load_recipe(str(path))


def test_explicit_grad_accum_must_agree_with_the_global_batch_size():
    cfg = load_recipe(DEMO, ["global_batch_size=3", "batch_shards=1"])  # the demo's grad_accum is 1
    with pytest.raises(RecipeError, match=r"global_batch_size=3, but .* = 1 x 1 x 1 = 1; set grad_accum=-1"):
        resolve_batch_layout(cfg, 1)
    cfg = load_recipe(DEMO, ["global_batch_size=3", "batch_shards=1", "grad_accum=-1"])
    assert resolve_batch_layout(cfg, 1) == (1, 3)
    cfg = load_recipe(DEMO, ["global_batch_size=-1", "grad_accum=2"])  # derived from the others
    assert resolve_batch_layout(cfg, 4) == (4, 2)
    cfg = load_recipe(DEMO, ["global_batch_size=8", "grad_accum=2"])
    assert resolve_batch_layout(cfg, 4) == (4, 2)
    with pytest.raises(RecipeError, match="cannot both be -1"):
        load_recipe(DEMO, ["global_batch_size=-1", "grad_accum=-1"])


def test_missing_inputs_are_found_before_anything_is_built(tmp_path):
    cfg = load_recipe(LLAVA_OV + ":stage1_manager_0.5b", [f"init_from={tmp_path}/no_params",
                                                          f"data.data_path={tmp_path}/{{a,b}}.json"])
    (tmp_path / "a.json").write_text("[]")
    with pytest.raises(RecipeError) as err:
        check_inputs(cfg)
    message = str(err.value)
    assert f"init_from: {tmp_path}/no_params: no such directory" in message
    assert f"data.data_path: {tmp_path}/b.json: not found" in message and "a.json" not in message
    assert "data.image_folder: data/LLaVA-Pretrain/images: no such directory" in message
    cfg = load_recipe(LLAVA_OV + ":stage2_manager_0.5b", [f"data.mixture={tmp_path}/mix.yaml", "init_from=None"])
    with pytest.raises(RecipeError, match="data.mixture: .*mix.yaml: no such file"):
        check_inputs(cfg)
    cfg = load_recipe(DEMO, ["data.image_folder=/no/such/dir"])
    check_inputs(cfg)  # the demo's data is generated at start: nothing to check
    with pytest.raises(RecipeError, match="data.data_path or data.mixture must be set"):
        check_inputs(load_recipe(DEMO, ["synthetic_records=None"]))
    # The demo recipe with the user's data: the generated set must not silently replace it.
    (tmp_path / "mix.yaml").write_text("datasets:\n  - json_path: a.json\n")
    for override in (f"data.data_path={tmp_path}/a.json", f"data.mixture={tmp_path}/mix.yaml"):
        with pytest.raises(RecipeError, match=rf"data\.\w+=.* is set, but synthetic_records=256 generates the data"):
            check_inputs(load_recipe(DEMO, [override]))
    check_inputs(load_recipe(DEMO, [f"data.data_path={tmp_path}/a.json", "synthetic_records=None"]))


def test_a_checkpoints_config_is_compared_field_by_field():
    saved = load_recipe(DEMO).to_dict()
    saved["data"]["data_path"] = "/runs/a/data/records.json"  # where the synthetic data was generated
    same = load_recipe(DEMO, ["output_dir=/elsewhere", "optim.lr=1e-4", "num_steps=50", "model.dtype=bfloat16"])
    other_run, changed = compare_with_saved(saved, same.to_dict())
    assert other_run == []
    assert changed == ["model.dtype: 'float32' -> 'bfloat16'", "num_steps: 40 -> 50", "optim.lr: 0.003 -> 0.0001"]
    other = load_recipe(DEMO, ["model.text.intermediate_size=256", "tunable_parts=mm_mlp_adapter", "data.seed=3"])
    other_run, _ = compare_with_saved(saved, other.to_dict())
    assert [line.split(":")[0] for line in other_run] == ["data.seed", "model.text.intermediate_size", "tunable_parts"]
    real = load_recipe(DEMO, ["synthetic_records=None", "data.data_path=/data/b.json"]).to_dict()
    saved_real = dict(real, data=dict(real["data"], data_path="/data/a.json", image_folder="/img"))
    other_run, changed = compare_with_saved(saved_real, real)
    assert other_run == ["data.data_path: '/data/a.json' -> '/data/b.json'"]
    assert changed == ["data.image_folder: '/img' -> None"]


def test_a_resume_that_would_change_the_record_order_is_another_run():
    """The saved data state is a position in the record order: a new order under it would repeat
    some records of the epoch and skip others. The grouped order of stage 2 also follows the step
    layout (rows x accumulation steps), which a plain shuffle does not."""
    real = ["synthetic_records=None", "data.data_path=/data/a.json"]
    saved = load_recipe(DEMO, real).to_dict()
    for override in ("data.seed=1", "data.shuffle=False", "data.group_by_modality_length=True"):
        other_run, _ = compare_with_saved(saved, load_recipe(DEMO, real + [override]).to_dict())
        assert [line.split(":")[0] for line in other_run] == [override.split("=")[0]]
        assert "record order" in other_run[0]
    layout = ["grad_accum=2", "global_batch_size=-1", "data.rows_per_host=2", "data.worker_count=2"]
    other_run, changed = compare_with_saved(saved, load_recipe(DEMO, real + layout).to_dict())
    # A shuffled order does not depend on the layout; the worker processes lay out the saved data state.
    assert other_run == ["data.worker_count: 0 -> 2"] and len(changed) == 2
    stage2 = LLAVA_OV + ":stage2_grid_manager_0.5b"
    layout = ["grad_accum=64", "global_batch_size=-1", "data.rows_per_host=4", "data.worker_count=2"]
    other_run, changed = compare_with_saved(load_recipe(stage2).to_dict(), load_recipe(stage2, layout).to_dict())
    assert [line.split(":")[0] for line in other_run] == ["data.rows_per_host", "data.worker_count", "grad_accum"]
    assert [line.split(":")[0] for line in changed] == ["global_batch_size"]


def test_saved_config_round_trips():
    cfg = load_recipe(LLAVA_OV + ":stage2_grid_manager_7b", ["optim.per_group_lr=False"])
    again = TrainConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    assert again.model.image.grid_pinpoints == cfg.model.image.grid_pinpoints


def test_recipe_selector_forms_agree():
    by_suffix = load_recipe(LLAVA_OV + ":stage1.5_manager_72b")
    by_set = load_recipe(LLAVA_OV, ["recipe=stage1.5_manager_72b"])
    assert by_suffix.to_dict() == by_set.to_dict()
    with pytest.raises(RecipeError, match="unknown recipe"):
        load_recipe(LLAVA_OV, ["recipe=stage3_manager_0.5b"])


# The scripts of SPEC §2.8, written out: (template, image mode, merge type, tunable parts, lrs, max_len).
STAGE_EXPECTED = {
    "1": ("plain", "mm_mlp_adapter", {"language_model": 1e-3, "projector": 1e-3}),
    # The scripts pass tower 2e-6 / manager 5e-5, which their DeepSpeed optimizer section drops (SPEC §2.8).
    "1.5": ("qwen_1_5", "mm_vision_tower,mm_mlp_adapter,mm_language_model",
            {"language_model": 1e-5, "projector": 1e-5, "vision_tower": 1e-5}),
    "2": ("qwen_1_5", "mm_vision_tower,mm_mlp_adapter,mm_language_model",
          {"language_model": 1e-5, "projector": 1e-5, "vision_tower": 1e-5}),
}


@pytest.mark.parametrize("stage", ["1", "1.5", "2"])
@pytest.mark.parametrize("variant", ["baseline", "manager", "grid", "grid_manager"])
@pytest.mark.parametrize("size", ["0.5b", "7b", "72b"])
def test_original_recipes(stage, variant, size):
    cfg = load_recipe(f"{LLAVA_OV}:stage{stage}_{variant}_{size}")
    template, tunable, lrs = STAGE_EXPECTED[stage]
    manager = variant.endswith("manager")
    grid = variant.startswith("grid") and stage != "1"
    assert cfg.data.template == template
    assert set(cfg.tunable_parts.split(",")) == set(tunable.split(",")) | ({"mm_manager"} if manager else set())
    group_lrs = cfg.optim.group_lrs()
    for group, lr in lrs.items():
        assert group_lrs[group] == lr
    if stage != "1":  # the scripts' per-module lrs, kept for optim.per_group_lr=True
        cfg.optim.per_group_lr = True
        assert cfg.optim.group_lrs()["vision_tower"] == 2e-6
        assert cfg.optim.group_lrs()["manager"] == (5e-5 if manager else 1e-5)
    if manager:
        assert group_lrs["manager"] == (1e-3 if stage == "1" else 1e-5)
        assert cfg.model.manager.type == "static_zerouni" and cfg.model.manager.grid_type == "all"
        assert cfg.model.manager.select_layers == list(range(13, 26))
    else:
        assert cfg.model.manager.type is None
    expected_mode = {"1.5": "anyres", "2": "anyres_max_9"}.get(stage) if grid else "square"
    assert cfg.model.image.aspect_ratio == expected_mode
    assert cfg.model.image.patch_merge_type == ("spatial_unpad" if grid else "flat")
    if grid:
        expected_pins = STAGE_1_5_PINPOINTS if stage == "1.5" else ANYRES_MAX_9_PINPOINTS
        assert cfg.model.image.grid_pinpoints == expected_pins
    # max_len 8192 (stage 1) / 16384; rows are padded to data.seq_len, never longer than max_len.
    assert cfg.data.seq_len <= (8192 if stage == "1" else 16384)
    assert cfg.optim.warmup_ratio == 0.03 and cfg.optim.weight_decay == 0.0 and cfg.optim.max_grad_norm == 1.0
    assert (cfg.optim.b1, cfg.optim.b2, cfg.optim.eps) == (0.9, 0.999, 1e-8)
    assert cfg.model.text.hidden_size == {"0.5b": 896, "7b": 3584, "72b": 8192}[size]
    # 512 samples per optimizer step (no packing: one sample per row) on any data-parallel size.
    assert not cfg.data.pack
    assert cfg.data.group_by_modality_length == (stage != "1")  # the stage 1.5 / 2 scripts set it
    for dp in (8, 32) + ((256,) if cfg.data.rows_per_host <= 2 else ()):
        shards, accum = resolve_batch_layout(cfg, dp)
        assert shards * accum * cfg.data.rows_per_host == 512
    # The loss is the original's: a token mean per micro-batch, averaged over ranks and accumulation
    # steps; a shard batch is the 0.5B scripts' per-device batch (16 in stage 1, 2 after), so the
    # same samples share a mean. bf16 compute on fp32 master weights, as DeepSpeed's bf16 mode.
    assert cfg.loss_normalization == "shard_mean"
    if size == "0.5b":
        assert cfg.data.rows_per_host == (16 if stage == "1" else 2)
    assert (cfg.model.dtype, cfg.model.param_dtype) == ("bfloat16", "float32")
