"""benchmarks/compare.py: pairs our lines with the reference's from the same file."""

import json

from benchmarks.compare import main, read_lines, table


def _write(path, rows):
    path.write_text("noise line\n" + "\n".join(json.dumps(r) for r in rows) + "\n{broken\n")


def test_pairs_train_and_generate_lines_and_judges_targets_only_on_h100(tmp_path, capsys):
    rows = [
        {"what": "train", "impl": "jax-manager_jax", "batch_per_device": 2, "image": "768x768", "variant": "grid",
         "remat": "none", "tokens_per_s": 80000.0, "mfu": 0.45, "step_s_median": 0.1, "device": "NVIDIA H100 80GB HBM3"},
        {"what": "train", "impl": "torch-hf", "batch": 2, "compile": True, "tokens_per_s": 41900.0, "device": "NVIDIA H100 80GB HBM3"},
        {"what": "train", "impl": "torch-hf", "batch": 2, "compile": False, "tokens_per_s": 32000.0, "mfu": 0.2,
         "step_s_median": 0.25, "device": "NVIDIA H100 80GB HBM3"},
        {"what": "generate", "impl": "jax", "batch": 16, "image": "768x768", "variant": "grid", "new_tokens": 128,
         "decode_tokens_per_s": 12000.0, "prefill_s": 0.2, "device": "1 x NVIDIA H100 80GB HBM3"},
        {"what": "generate", "impl": "torch-hf", "batch": 16, "decode_tokens_per_s": 200.0, "prefill_s": 0.4},
    ]
    path = tmp_path / "bench.jsonl"
    _write(path, rows)
    assert len(read_lines([str(path)])) == len(rows)
    text = "\n".join(table(read_lines([str(path)])))
    train = next(line for line in text.splitlines() if "tokens/s" in line and line.startswith("| train"))
    assert f"{80000 / 32000:.2f}x" in train and ": met |" in train  # vs eager, not compiled
    gen = next(line for line in text.splitlines() if line.startswith("| generate B=16"))
    assert f"{12000 / 200:.1f}x" in gen and ": not met |" in gen  # 12,000 < 15,000
    prefill = next(line for line in text.splitlines() if "prefill ms" in line)
    assert "200.0" in prefill and "400.0" in prefill and "2.00x" in prefill
    assert main([str(path)]) == 0 and "| workload |" in capsys.readouterr().out


def test_other_devices_are_not_judged_and_empty_input_fails(tmp_path):
    path = tmp_path / "cpu.jsonl"
    _write(path, [{"what": "generate", "impl": "jax", "batch": 1, "decode_tokens_per_s": 9999.0, "device": "1 x cpu"}])
    text = "\n".join(table(read_lines([str(path)])))
    assert ": met" not in text and ": not met" not in text and "not judged" in text
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main([str(empty)]) == 1


def test_variants_are_labelled_by_their_layers_and_xla_flags(tmp_path):
    base = {"what": "train", "impl": "jax-manager_jax", "batch_per_device": 2, "remat": "dots", "tokens_per_s": 1.0}
    path = tmp_path / "variants.jsonl"
    dump = " --xla_dump_to=/x/train --xla_dump_hlo_module_re=jit_(train_step)"  # every run of gpu_session.sh
    _write(path, [dict(base, layers="scan", xla_flags=dump),
                  dict(base, layers="unrolled", xla_flags="--xla_foo=1" + dump)])
    labels = [line for line in table(read_lines([str(path)])) if "tokens/s" in line]
    assert "remat dots, scan layers)" in labels[0]
    assert "remat dots, unrolled layers, XLA_FLAGS=--xla_foo=1)" in labels[1]


def test_generate_and_train_experiments_are_labelled(tmp_path):
    path = tmp_path / "experiments.jsonl"
    _write(path, [
        {"what": "train", "impl": "jax-manager_jax", "batch_per_device": 2, "remat": "dots", "layers": "scan",
         "vision_token_multiple": 1, "loss_token_budget": 896, "seq": 4099, "row_len": 4160, "tokens_per_s": 1.0,
         "timing": "back_to_back"},
        {"what": "generate", "impl": "jax", "batch": 1, "new_tokens": 8, "decode_layers": "unrolled",
         "decode_min_rows": 2, "decode_attention": "xla", "decode_tokens_per_s": 1.0},
        {"what": "generate", "impl": "jax", "batch": 1, "new_tokens": 8, "decode_layers": "unrolled",
         "decode_min_rows": 1, "decode_tokens_per_s": 1.0},
        {"what": "generate", "impl": "jax", "batch": 16, "new_tokens": 8, "decode_layers": "unrolled",
         "decode_min_rows": 2, "decode_attention": "pallas", "decode_tokens_per_s": 1.0},
        {"what": "generate", "impl": "jax", "batch": 16, "new_tokens": 8, "decode_layers": "unrolled",
         "decode_min_rows": 2, "decode_attention": "pallas", "decode_kernel": "64,528,4,3", "decode_tokens_per_s": 1.0},
        {"what": "generate", "impl": "jax", "batch": 1, "new_tokens": 8, "decode_min_rows": 1, "device": "1 x cpu",
         "decode_attention": "pallas", "decode_matmul": "pallas", "decode_matmul_kernels": "down=16,256,4,4",
         "decode_tokens_per_s": 1.0},
        {"what": "generate", "impl": "jax", "batch": 16, "new_tokens": 8, "decode_min_rows": 2, "decode_check_every": 8,
         "decode_command_buffers": True, "tokens_sha1": "0123456789ab", "decode_tokens_per_s": 1.0},
        {"what": "generate", "impl": "jax", "batch": 1, "new_tokens": 8, "decode_tokens_per_s": 1.0,
         "decode_xla_options": {"xla_gpu_exhaustive_tiling_search": True}, "first_call_s": 73.25},
    ])
    labels = [line for line in table(read_lines([str(path)])) if "tokens/s" in line]
    assert ("decoded as >= 2 rows, end checked every 8 tokens, loops in CUDA graphs, tokens 0123456789ab)"
            in labels[6])
    assert ("scan layers, LM head on 896 positions per shard, crops unpadded, rows padded to 4160, steps timed back "
            "to back)") in labels[0]
    assert "unrolled layers, decoded as >= 2 rows, xla decode attention)" in labels[1]
    assert "unrolled layers, one row per prompt)" in labels[2]  # not the GPU's two rows
    assert "row" not in labels[5] and "pallas decode attention, pallas decode matmuls down=16,256,4,4)" in labels[5]
    assert "unrolled layers, decoded as >= 2 rows, pallas decode attention)" in labels[3]
    assert "pallas decode attention 64,528,4,3)" in labels[4]
    assert "decode XLA options xla_gpu_exhaustive_tiling_search=True)" in labels[7]
    first_calls = [line for line in table(read_lines([str(path)])) if "first call s" in line]
    assert len(first_calls) == 1 and "| 73.2 |" in first_calls[0]  # only the run that reports it
