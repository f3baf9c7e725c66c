"""Inference: generation and scoring.

- `engine`: `InferenceEngine` (prepare / prefill / decode_step / generate / score), bucketing.
- `sampling`: greedy, temperature / top-k / top-p, repetition penalty, vocabulary limit.
- `requests`: questions + images -> qwen_1_5 evaluation prompts and score requests.
- `loading`: checkpoints (optionally restored straight into shards), images, eos ids, meshes.
- `cli`: `run.py generate` and `run.py score`.
- `lmms_adapter`: the lmms-eval model `llava_ov_manager_jax`.
"""
