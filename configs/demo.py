"""The demo: a tiny "Baseline + Manager" model trained on generated captions and VQA, on CPU in minutes.

    python run.py train --config configs/demo.py [--set output_dir=runs/demo2 --set num_steps=60]
    python run.py generate --checkpoint runs/demo/checkpoints ...

A synthetic data set (manager_jax/data/synthetic.py: one coloured shape per image, captions and
questions about colour / shape / position, a few text-only records) is generated into
<output_dir>/data at start. The model is `tiny()` (4 + 4 layers, width 64) with the real Qwen2
vocabulary so the offline tokenizer and `run.py generate` work on it; square images (one crop, 729
tokens) keep a step cheap on two CPU cores. Only the supervised positions go through the 151,936-row
LM head (`loss_token_budget`), which is most of the saving.
"""

from manager_jax.config import tiny
from manager_jax.data.pipeline import DataConfig
from manager_jax.sharding import MeshConfig
from manager_jax.train.optimizer import OptimConfig
from manager_jax.train.recipe import CheckpointConfig, LoggingConfig, TrainConfig

QWEN_VOCAB = 151936
IMAGE_TOKEN_ID = 151646  # "<image>" in HF-style Qwen2 tokenizers


def get_config() -> TrainConfig:
    model = tiny("manager", image_token_id=IMAGE_TOKEN_ID)
    model.text.vocab_size = QWEN_VOCAB
    return TrainConfig(
        name="demo",
        output_dir="runs/demo",
        model=model,
        data=DataConfig(
            template="qwen_1_5",
            rows_per_host=1,
            seq_len=1024,  # one image sample (729 image tokens + text) per row, text-only ones packed in
            max_crops=1,
            max_image_tokens=729,
            pack=True,
            num_epochs=None,
            seed=0,
            read_threads=1,
        ),
        optim=OptimConfig(lr=3e-3, warmup_ratio=0.1, schedule="cosine"),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        checkpoint=CheckpointConfig(every_steps=20, keep=2),
        logging=LoggingConfig(every_steps=1),
        # Like stage 2 but with the (expensive on CPU) vision tower frozen.
        tunable_parts="mm_mlp_adapter,mm_manager,mm_language_model",
        num_steps=40,
        global_batch_size=-1,  # derived: one row per data-parallel device (shards x 1 row x 1)
        batch_shards=-1,
        grad_accum=1,
        seed=0,
        loss_token_budget=128,
        synthetic_records=256,
        synthetic_image_sizes=[(384, 384), (320, 240), (240, 320), (400, 300)],
    )
