"""`run.py generate` / `run.py score` on a tiny checkpoint with the real Qwen2 vocabulary size.

Expected answers and log-likelihoods are recomputed here with the model's uncached full forward
over the prompt built by the conversation module; errors are checked by their messages.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from manager_jax import params_io
from manager_jax.data.conversation import build_eval_prompt
from manager_jax.data.tokenizer import load_tokenizer
from manager_jax.infer.cli import generate_main, score_main
from manager_jax.infer.engine import InferenceEngine, Prompt
from manager_jax.infer.loading import load_model
from manager_jax.reference.parity import random_image
from tests.test_infer_engine import full_forward_logits, tiny_model

VOCAB = 151936
LIMIT = 151646  # len(tokenizer) of the original evaluation: ids from <image> (151646) on are excluded


def save_tiny_checkpoint(directory: str) -> str:
    """A tiny Manager model (square images) with the full Qwen2 vocabulary, as a params directory.
    Heads of 32, the smallest the fused decode kernels take (`--decode-attention pallas`)."""
    from flax import nnx

    from manager_jax.config import tiny

    model = tiny_model("manager", vocab=VOCAB, head_dim=32)
    cfg = tiny("manager", image_token_id=151646).replace(text=model.cfg.text)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return params_io.save_params(directory, params, cfg)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """(params directory, an image file, the folder holding them); shared with the adapter tests."""
    root = tmp_path_factory.mktemp("infer_cli")
    ckpt = save_tiny_checkpoint(str(root / "ckpt"))
    image = root / "photo.png"
    random_image((90, 70), 11).save(image)
    (root / "broken.png").write_bytes(b"not an image at all")
    return ckpt, str(image), root


@pytest.fixture(scope="module")
def model_and_tokenizer(checkpoint):
    return load_model(checkpoint[0]), load_tokenizer(None)


def greedy_reference(model, tok, question: str, image_paths: list[str], steps: int) -> list[int]:
    """Greedy answer from uncached full forwards, stopping on Qwen2-Instruct's eos ids."""
    from PIL import Image

    images = [Image.open(p) for p in image_paths]
    prompt = Prompt(build_eval_prompt(question, len(images), tok), images)
    helper = InferenceEngine(model)  # only its preprocessing is used here
    out: list[int] = []
    for _ in range(steps):
        token = int(np.argmax(full_forward_logits(model, helper, prompt, out)[:LIMIT]))
        out.append(token)
        if token in (151645, 151643):
            break
    return out


@pytest.fixture(scope="module")
def shown_answer(checkpoint, model_and_tokenizer) -> list[int]:
    """The greedy reference answer (5 tokens) to "What is shown?" about the image: computed once for
    every decode path that must give it."""
    model, tok = model_and_tokenizer
    return greedy_reference(model, tok, "What is shown?", [checkpoint[1]], 5)


def run(main, argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("decode_attention,decode_matmul", [("xla", "xla"), ("pallas", "xla"), ("pallas", "pallas")])
def test_generate_json_matches_full_forward_greedy(checkpoint, model_and_tokenizer, shown_answer, capsys,
                                                   decode_attention, decode_matmul):
    ckpt, image, _ = checkpoint
    # The kernels with one split per row and KV head (no combine kernel): the same tokens.
    kernels = ["--decode-kernels", "1:16,1,4,1"] if decode_attention == "pallas" else []
    if decode_matmul == "pallas":
        kernels += ["--decode-matmul", "pallas", "--decode-matmul-kernels", "down=16,32,4,1"]
    if decode_attention == "xla":
        # Taken (GPU options: nothing changes here).
        kernels += ["--decode-command-buffers", "--decode-multi-output-fusion"]
    code, out, err = run(generate_main, ["--checkpoint", ckpt, "--image", image, "--prompt", "What is shown?",
                                         "--max-new-tokens", "5", "--json", "--decode-attention", decode_attention,
                                         *kernels], capsys)
    assert code == 0, err
    record = json.loads(out)
    _, tok = model_and_tokenizer
    assert record["token_ids"] == shown_answer
    assert record["text"] == tok.decode(shown_answer, skip_special_tokens=True).strip()
    assert record["finish_reason"] in ("eos", "length")


def test_a_checkpoint_trained_with_cudnn_attention_generates_off_gpu(checkpoint, shown_answer, capsys, tmp_path):
    """attention_impl "cudnn" in a checkpoint's config (a GPU run's choice of kernel) runs on its
    "auto" choice here: the answer of the same weights (it crashed in tracing, "cuDNN is not detected")."""
    import shutil

    ckpt, image, _ = checkpoint
    shutil.copytree(ckpt, tmp_path / "gpu_run")
    config_path = tmp_path / "gpu_run" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(dict(config, attention_impl="cudnn")))
    code, out, err = run(generate_main, ["--checkpoint", str(tmp_path / "gpu_run"), "--image", image, "--prompt",
                                         "What is shown?", "--max-new-tokens", "5", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["token_ids"] == shown_answer


def test_generate_jsonl_batch_equals_single_prompts(checkpoint, capsys, tmp_path):
    ckpt, image, root = checkpoint
    prompts = tmp_path / "prompts.jsonl"
    os.symlink(image, tmp_path / "local.png")
    prompts.write_text(json.dumps({"prompt": "Describe it.", "images": ["local.png"]}) + "\n\n"
                       + json.dumps({"prompt": "Say something long and unrelated to images."}) + "\n")
    code, out, err = run(generate_main, ["--checkpoint", ckpt, "--prompts", str(prompts), "--max-new-tokens", "4",
                                         "--json"], capsys)
    assert code == 0, err
    batch = [json.loads(line) for line in out.strip().splitlines()]
    assert len(batch) == 2
    code, out, _ = run(generate_main, ["--checkpoint", ckpt, "--image", image, "--prompt", "Describe it.",
                                       "--max-new-tokens", "4", "--json"], capsys)
    assert json.loads(out) == batch[0]


def test_jsonl_sampling_gives_repeated_prompts_their_own_draws(checkpoint, capsys, tmp_path):
    """A prompt repeated in a JSONL file gets independent samples, and each line's sample does not
    depend on --batch-size (before, every batch reused the seed's key: copies at batch size 1). A
    batch of 5 decodes as 8 rows (the bucket)."""
    ckpt, image, _ = checkpoint
    prompts = tmp_path / "dup.jsonl"
    prompts.write_text((json.dumps({"prompt": "Tell me a story", "images": [image]}) + "\n") * 5)
    outputs = {}
    for batch_size in ("1", "5", "3"):
        code, out, err = run(generate_main, ["--checkpoint", ckpt, "--prompts", str(prompts), "--json",
                                             "--max-new-tokens", "5", "--temperature", "3", "--seed", "7",
                                             "--batch-size", batch_size], capsys)
        assert code == 0, err
        outputs[batch_size] = [json.loads(line)["token_ids"] for line in out.strip().splitlines()]
    assert outputs["1"] == outputs["5"] == outputs["3"]
    assert len({tuple(t) for t in outputs["1"]}) == 5, outputs["1"]
    code, out, _ = run(generate_main, ["--checkpoint", ckpt, "--image", image, "--prompt", "Tell me a story",
                                       "--json", "--max-new-tokens", "5", "--temperature", "3", "--seed", "7"], capsys)
    assert json.loads(out)["token_ids"] == outputs["1"][0]


def test_score_matches_full_forward_loglikelihood(checkpoint, model_and_tokenizer, capsys):
    ckpt, image, _ = checkpoint
    model, tok = model_and_tokenizer
    code, out, err = run(score_main, ["--checkpoint", ckpt, "--image", image, "--prompt", "What colour?",
                                      "--continuation", "Blue sky", "--json"], capsys)
    assert code == 0, err
    record = json.loads(out)
    from PIL import Image

    prompt = Prompt(build_eval_prompt("What colour?", 1, tok), [Image.open(image)])
    continuation = tok.encode("Blue sky")
    helper = InferenceEngine(model)
    logprob, greedy = 0.0, True
    for i, token in enumerate(continuation):
        logits = full_forward_logits(model, helper, prompt, continuation[:i])[:LIMIT].astype(np.float64)
        logprob += logits[token] - (np.log(np.sum(np.exp(logits - logits.max()))) + logits.max())
        greedy &= int(np.argmax(logits)) == token
    assert record["num_tokens"] == len(continuation) == 2
    assert abs(record["logprob"] - logprob) < 1e-4
    assert record["is_greedy"] == greedy


def test_clear_errors(checkpoint, capsys, tmp_path):
    ckpt, image, root = checkpoint
    code, _, err = run(generate_main, ["--checkpoint", str(tmp_path / "nope"), "--prompt", "hi"], capsys)
    assert code == 2 and "checkpoint not found" in err
    code, _, err = run(generate_main, ["--checkpoint", ckpt, "--image", str(root / "missing.png"), "--prompt", "hi"],
                       capsys)
    assert code == 2 and "error: --image: image not found" in err  # the flag that names it
    code, _, err = run(generate_main, ["--checkpoint", ckpt, "--image", str(root / "broken.png"), "--prompt", "hi"],
                       capsys)
    assert code == 2 and "cannot read image" in err
    code, _, err = run(score_main, ["--checkpoint", ckpt, "--image", image, "--prompt", "hi", "--continuation", "x",
                                    "--max-length", "300"], capsys)
    assert code == 2 and "more than the max_length of 300" in err
    code, _, err = run(generate_main, ["--checkpoint", str(root), "--prompt", "hi"], capsys)
    assert code == 2 and "cannot read checkpoint" in err
    code, _, err = run(generate_main, ["--checkpoint", ckpt, "--prompt", "hi", "--decode-kernels", "16:64,528"], capsys)
    assert code == 2 and "--decode-kernels: a kernel config is four positive integers" in err
    code, _, err = run(generate_main, ["--checkpoint", ckpt, "--prompt", "hi", "--decode-matmul-kernels", "mlp=16,32,4,1"],
                       capsys)
    assert code == 2 and "--decode-matmul-kernels: a matmul config by projection" in err
    code, _, err = run(generate_main, ["--checkpoint", ckpt, "--prompt", "hi", "--decode-attention", "xla",
                                       "--decode-matmul", "pallas"], capsys)
    assert code == 2 and "needs decode_attention='pallas'" in err
    with pytest.raises(SystemExit):
        generate_main(["--checkpoint", ckpt, "--prompt", "hi", "--prompts", "x.jsonl"])
    with pytest.raises(SystemExit):
        generate_main(["--checkpoint", ckpt, "--prompt", "hi", "--top-p", "0"])


def test_image_over_pils_pixel_limit_is_a_one_line_error(checkpoint, capsys, monkeypatch):
    # PIL refuses images over 2 x MAX_IMAGE_PIXELS (a decompression bomb) with an exception that is
    # not an OSError; the limit is lowered so that the 90x70 test image exceeds it.
    from PIL import Image

    ckpt, image, _ = checkpoint
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    code, _, err = run(generate_main, ["--checkpoint", ckpt, "--image", image, "--prompt", "hi"], capsys)
    assert code == 2 and "cannot read image" in err and "decompression bomb" in err
    assert "Traceback" not in err


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # no Orbax thread tracebacks
def test_damaged_checkpoints_give_one_line_errors(checkpoint, capsys, tmp_path):
    """An interrupted save (params/ with only _METADATA), missing array files, an empty params/ and a
    malformed config.json: `error: cannot read checkpoint ...`, exit 2 (bad input), no traceback."""
    import shutil

    ckpt, _, _ = checkpoint
    cases = {}
    for name in ("no_arrays", "empty", "bad_json"):
        shutil.copytree(ckpt, tmp_path / name)
    shutil.rmtree(tmp_path / "no_arrays" / "params" / "d")
    cases["no_arrays"] = "missing d"
    shutil.rmtree(tmp_path / "empty" / "params")
    (tmp_path / "empty" / "params").mkdir()
    cases["empty"] = "holds no readable Orbax checkpoint"
    (tmp_path / "bad_json" / "config.json").write_text('{"text": ')
    cases["bad_json"] = "config.json: not valid JSON"
    run_dir = tmp_path / "run" / "60" / "params"
    run_dir.mkdir(parents=True)
    shutil.copy(os.path.join(ckpt, "params", "_METADATA"), run_dir / "_METADATA")
    shutil.copy(os.path.join(ckpt, "config.json"), tmp_path / "run" / "config.json")
    cases["run"] = "holds no readable Orbax checkpoint (missing manifest.ocdbt, d)"  # no committed step to fall back to
    # A training run whose first save is still being written (it was "neither a params directory nor ...").
    (tmp_path / "first_save" / "checkpoints" / "20.orbax-checkpoint-tmp-1764").mkdir(parents=True)
    cases["first_save"] = "holds no complete checkpoint yet (20.orbax-checkpoint-tmp-1764: a first save in progress"
    for name, message in cases.items():
        for main, extra in ((generate_main, []), (score_main, ["--continuation", "x"])):
            code, _, err = run(main, ["--checkpoint", str(tmp_path / name), "--prompt", "hi", *extra], capsys)
            assert code == 2 and err.startswith("error: cannot read checkpoint") and message in err, (name, err)
            assert "Traceback" not in err


def test_log_level_debug_adds_the_traceback_and_a_misspelt_one_is_a_usage_error(capsys, tmp_path):
    """generate and score take train's --log-level: DEBUG prints a user error's traceback above its
    one line (they had no --log-level), a misspelt level is refused before anything is read."""
    missing = ["--checkpoint", str(tmp_path / "none"), "--prompt", "hi"]
    for main, extra in ((generate_main, []), (score_main, ["--continuation", "x"])):
        code, _, err = run(main, missing + extra + ["--log-level", "debug"], capsys)
        assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("error: "), err
        code, _, err = run(main, missing + extra, capsys)
        assert code == 2 and "Traceback" not in err
        with pytest.raises(SystemExit) as exit_:
            main(missing + extra + ["--log-level", "LOUD"])
        assert exit_.value.code == 2 and "--log-level: 'LOUD' is not one of" in capsys.readouterr().err


def test_damaged_generation_config_gives_one_line_errors(checkpoint, capsys, tmp_path):
    """generation_config.json (eos ids, repetition penalty, top_k / top_p) that is not JSON, not an object, or holds
    values of the wrong type: `error: cannot read checkpoint ...` naming the file, exit 2 (score used
    to crash with a traceback, generate to print its usage and a bare JSON parser message)."""
    import shutil

    ckpt, _, _ = checkpoint
    cases = {"truncated": '{"eos_token_id": ', "list": "[1, 2]", "eos_text": '{"eos_token_id": ["x"]}',
             "penalty_text": '{"repetition_penalty": "high"}', "penalty_zero": '{"repetition_penalty": 0}',
             "top_k": '{"top_k": 2.5}', "top_p": '{"top_p": 0}'}
    for name, text in cases.items():
        shutil.copytree(ckpt, tmp_path / name)
        (tmp_path / name / "generation_config.json").write_text(text)
        for main, extra in ((generate_main, ["--max-new-tokens", "1"]), (score_main, ["--continuation", "x"])):
            if main is score_main and not name.startswith("eos") and name not in ("truncated", "list"):
                continue  # scoring reads the eos ids only
            try:
                code, out, err = run(main, ["--checkpoint", str(tmp_path / name), "--prompt", "hi", *extra], capsys)
            except SystemExit as exit_:  # a usage message is not the right answer either
                code, out, err = exit_.code, *capsys.readouterr()
            assert code == 2 and out == "", (name, main.__name__, code)
            assert err.startswith("error: cannot read checkpoint") and "generation_config.json" in err, (name, err)
            assert len(err.strip().splitlines()) == 1, (name, err)


def test_out_of_range_values_are_usage_errors(checkpoint, capsys):
    """Non-finite sampling values, --max-length < 1, --vocab-limit 0: exit 2 before anything loads
    (inf and nan used to produce excluded ids or "!!!", 0 was read as "default")."""
    ckpt, image, _ = checkpoint
    base = ["--checkpoint", ckpt, "--prompt", "hi"]
    for extra in (["--temperature", "inf"], ["--temperature", "nan"], ["--repetition-penalty", "nan"],
                  ["--repetition-penalty", "inf"], ["--max-length", "0"], ["--max-length", "-5"],
                  ["--vocab-limit", "0"], ["--vocab-limit", "-2"]):
        with pytest.raises(SystemExit) as exit_:
            generate_main(base + extra)
        assert exit_.value.code == 2, extra
    for extra in (["--max-length", "0"], ["--vocab-limit", "0"]):
        with pytest.raises(SystemExit) as exit_:
            score_main(base + ["--continuation", "x"] + extra)
        assert exit_.value.code == 2, extra
    capsys.readouterr()
    # A limit below the eos ids: answers could never end. A continuation token past the limit: -inf.
    code, _, err = run(generate_main, base + ["--vocab-limit", "100"], capsys)
    assert code == 2 and "excludes the eos ids" in err
    code, out, err = run(score_main, base + ["--continuation", "Blue sky", "--vocab-limit", "100", "--json"], capsys)
    assert code == 2 and "excluded by the vocab limit of 100" in err and out == ""
    code, out, err = run(score_main, base + ["--continuation", "<image>"], capsys)
    assert code == 2 and "the continuation must not contain '<image>'" in err


def test_sampling_value_errors_name_the_flag(checkpoint, capsys):
    """An out-of-range sampling value is refused naming the flag to fix, not the dataclass field."""
    base = ["--checkpoint", checkpoint[0], "--prompt", "hi"]
    for flag, value in (("--temperature", "-1"), ("--top-p", "2"), ("--top-k", "-1"),
                        ("--repetition-penalty", "0"), ("--max-new-tokens", "0"), ("--seed", str(2**32)),
                        ("--seed", "-1")):
        with pytest.raises(SystemExit) as exit_:
            generate_main(base + [flag, value])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert exit_.value.code == 2 and err.startswith(f"run.py generate: error: {flag} "), (flag, err)


def test_jsonl_lines_are_all_checked_before_the_first_answer(checkpoint, capsys, tmp_path):
    """A bad image, a placeholder mismatch or a too long prompt on a late line: nothing is generated,
    and the error names FILE:LINE (it used to fail after the earlier batches, as 'prompt 0')."""
    ckpt, image, root = checkpoint
    good = json.dumps({"prompt": "Describe it.", "images": [image]}) + "\n"
    (tmp_path / "folder.png").mkdir()
    cases = {
        "broken": (json.dumps({"prompt": "x", "images": [str(root / "broken.png")]}), "cannot read image"),
        "folder": (json.dumps({"prompt": "x", "images": ["folder.png"]}), "is a directory, not an image file"),
        "missing": (json.dumps({"prompt": "x", "images": ["nope.png"]}), "image not found"),
        "placeholders": (json.dumps({"prompt": "<image> and <image>", "images": [image]}),
                         "2 '<image>' placeholders but 1 images"),
        "long": (json.dumps({"prompt": "word " * 1200}), "more than the max_length of 1000"),
        "typo": (json.dumps({"prompt": "Describe it.", "image": image}), "unknown key(s) 'image'"),
    }
    for name, (line, message) in cases.items():
        prompts = tmp_path / f"{name}.jsonl"
        prompts.write_text(good + "\n" + good + line + "\n")
        code, out, err = run(generate_main, ["--checkpoint", ckpt, "--prompts", str(prompts), "--json",
                                             "--batch-size", "1", "--max-new-tokens", "2", "--max-length", "1000"],
                             capsys)
        assert code == 2 and out == "", (name, out)
        assert f"{prompts}:4" in err and message in err, (name, err)


def test_jsonl_line_that_leaves_no_room_to_answer_is_refused_before_the_first_answer(checkpoint, model_and_tokenizer,
                                                                                     capsys, tmp_path):
    """A line whose prompt fills --max-length exactly passed the up-front check (it fits) and then
    failed in its own batch, after the earlier lines' answers were printed."""
    ckpt, _, _ = checkpoint
    _, tok = model_and_tokenizer
    long = "word " * 40
    length = len(build_eval_prompt(long, 0, tok))
    prompts = tmp_path / "full.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"prompt": long}) + "\n")
    argv = ["--checkpoint", ckpt, "--prompts", str(prompts), "--json", "--batch-size", "1", "--max-new-tokens", "2"]
    code, out, err = run(generate_main, argv + ["--max-length", str(length)], capsys)
    assert code == 2 and out == "", out
    assert f"{prompts}:2" in err and "no room to generate" in err, err
    code, out, err = run(generate_main, argv + ["--max-length", str(length + 1)], capsys)  # room for one token
    assert code == 0, err
    assert [len(json.loads(line)["token_ids"]) for line in out.strip().splitlines()] == [2, 1]


def test_tokenizer_folder_without_a_tokenizer(checkpoint, capsys, tmp_path):
    ckpt, _, _ = checkpoint
    (tmp_path / "empty").mkdir()
    code, _, err = run(generate_main, ["--checkpoint", ckpt, "--prompt", "hi", "--tokenizer", str(tmp_path / "empty")],
                       capsys)
    assert code == 2 and err.startswith("error: cannot load the tokenizer from") and "Traceback" not in err


def test_load_model_restores_into_shards(checkpoint, model_and_tokenizer, capsys):
    import jax
    from flax import nnx

    from manager_jax.infer.loading import MeshSpecError, mesh_from_spec

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices; tests/conftest.py provides them on CPU")
    mesh = mesh_from_spec("tensor=2")  # fsdp takes the remaining 4 devices
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    sharded = nnx.to_pure_dict(nnx.state(load_model(checkpoint[0], mesh=mesh)))
    plain = nnx.to_pure_dict(nnx.state(model_and_tokenizer[0]))
    embedding = sharded["text"]["embed"]["embedding"]
    assert embedding.sharding.mesh.shape == mesh.shape and len(embedding.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(embedding), np.asarray(plain["text"]["embed"]["embedding"]))
    with pytest.raises(MeshSpecError, match="bad mesh entry"):
        mesh_from_spec("model=2")
    with pytest.raises(MeshSpecError):
        mesh_from_spec("data=3")  # 8 devices cannot be split in 3
    code, _, err = run(generate_main, ["--checkpoint", checkpoint[0], "--prompt", "hi", "--mesh", "data=3"], capsys)
    assert code == 2 and "mesh 'data=3'" in err



@pytest.mark.parametrize("spec", ["data=--1", "tensor=-+2", "data=\u00b2", "fsdp=\u0661"])
def test_mesh_spec_with_a_malformed_number_is_a_mesh_error(spec):
    """Sizes that pass a digits-only look but are no integer (a doubled sign, a superscript or
    Arabic-Indic digit) are a bad mesh entry, not a ValueError from int() with a traceback."""
    from manager_jax.infer.loading import MeshSpecError, mesh_from_spec

    with pytest.raises(MeshSpecError, match="bad mesh entry"):
        mesh_from_spec(spec)


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    """Ctrl-C in `run.py generate` / `score` (here raised where the command runs): one
    `error: interrupted` line and exit status 130, as `train` and the converter do."""
    import run
    from manager_jax.infer import cli

    def interrupted(argv):
        raise KeyboardInterrupt

    for command, entry in (("generate", "generate_main"), ("score", "score_main")):
        monkeypatch.setattr(cli, entry, interrupted)
        assert run.main([command, "--checkpoint", "x"]) == 130
        assert capsys.readouterr().err == "error: interrupted\n"


def test_sampling_without_top_k_or_top_p_takes_hfs_defaults(checkpoint, capsys, tmp_path):
    """`--temperature T` alone samples as HF `generate(do_sample=True, temperature=T)`: top_k and
    top_p from the checkpoint's generation_config.json, else GenerationConfig's defaults (top_k
    50); an explicit --top-k / --top-p wins (0 and 1 are "off")."""
    import shutil

    from transformers import GenerationConfig

    hf = GenerationConfig._get_default_generation_params()
    ckpt, image, _ = checkpoint

    def tokens(directory, *extra):
        code, out, err = run(generate_main, ["--checkpoint", directory, "--image", image, "--prompt", "Tell me a story",
                                             "--json", "--max-new-tokens", "6", "--temperature", "3", "--seed", "4",
                                             *extra], capsys)
        assert code == 0, err
        return json.loads(out)["token_ids"]

    default, no_top_k = tokens(ckpt), tokens(ckpt, "--top-k", "0")
    assert default == tokens(ckpt, "--top-k", str(hf["top_k"]), "--top-p", str(hf["top_p"]))
    assert default != no_top_k  # the defaults matter here
    shutil.copytree(ckpt, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "generation_config.json").write_text('{"top_k": 3, "top_p": 0.6}')
    configured = str(tmp_path / "ckpt")
    assert tokens(configured) == tokens(ckpt, "--top-k", "3", "--top-p", "0.6") != default
    assert tokens(configured, "--top-k", "0", "--top-p", "1") == no_top_k
