"""Generation and scoring compiled ahead of time (`InferenceEngine.compile_generate` and
`compile_score`, `run.py compile-generate`).

The programs it compiles must be the ones `generate` and `score` run: run with real inputs they
give `generate`'s tokens and `score`'s log-likelihoods. Over an abstract model on a mesh, the parameters arrive sharded.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from manager_jax.data.conversation import IMAGE_TOKEN_INDEX
from manager_jax.infer.aot import GenerateWorkload, compile_generate_for_topology, main, model_config
from manager_jax.infer.engine import (
    MULTI_OUTPUT_FUSION,
    XLA_COMMAND_BUFFER_DEFAULTS,
    InferenceEngine,
    Prompt,
    ScoreRequest,
    decode_compiler_options,
)
from manager_jax.infer.sampling import SamplingParams
from manager_jax.models.llava_ov import LlavaOV
from manager_jax.platform import compiling_for
from manager_jax.reference.parity import random_image
from manager_jax.train.aot import AotError, libtpu_available
from tests.test_infer_engine import tiny_model
from tests.test_train_aot import _gpu_devices_or_skip

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py sets 8 fake CPU devices)")


@pytest.mark.parametrize("min_rows", [1, 3])
def test_compiled_programs_are_the_ones_generate_runs(min_rows):
    """min_rows 3: two prompts decode as three rows (GPUs decode one prompt as two), so the decode
    program takes filler rows."""
    model = tiny_model("grid_manager")
    engine = InferenceEngine(model, pad_id=0, decode_min_rows=min_rows)
    prompts = [Prompt([1, 2, IMAGE_TOKEN_INDEX, 3], [random_image((200, 120), 1)]), Prompt([4, 5, 6, 7, 8])]
    params = SamplingParams(max_new_tokens=7)
    prepared = engine.prepare(prompts)
    compiled = engine.compile_generate(prepared, params)

    rows, new_slots = len(prepared.lengths), engine.new_slots(prepared, params)
    inputs = engine._put(dict(prepared.inputs, lengths=prepared.lengths), rows)
    lengths = inputs.pop("lengths")
    first_logits, cache = compiled["prefill"](engine.state, inputs, lengths)
    controls, kv_seg, next_pos = engine._decode_controls(prepared, params, new_slots)
    if rows < min_rows:
        first_logits, cache, kv_seg, next_pos = engine._filler_rows(min_rows - rows, prepared.prompt_slots,
                                                                    first_logits, cache, kv_seg, next_pos)
    out, count, _, _, _ = compiled["decode"](engine.state, first_logits, cache, kv_seg, next_pos, controls,
                                          jax.random.key(params.seed))
    assert out.shape[0] == max(rows, min_rows)
    tokens = [np.asarray(out)[r, : int(count[r])].tolist() for r in range(len(prompts))]
    assert tokens == [g.token_ids for g in engine.generate(prompts, params)]


def test_compiled_score_program_is_the_one_score_runs():
    """Two requests (one with an image), run through the compiled program: `score`'s log-likelihoods."""
    engine = InferenceEngine(tiny_model("grid_manager"), pad_id=0)
    requests = [ScoreRequest([1, 2, IMAGE_TOKEN_INDEX, 3, 9, 10], 4, 6, [random_image((200, 120), 1)]),
                ScoreRequest([4, 5, 6, 7, 8], 2, 5)]
    compiled = engine.compile_score(requests)
    args, kwargs, _ = engine._score_call(requests, engine._put)
    logprob, greedy = compiled(*args)
    expected = engine.score(requests)
    np.testing.assert_allclose(np.asarray(logprob)[:2], [r.logprob for r in expected], rtol=1e-6)
    assert np.asarray(greedy)[:2].tolist() == [r.is_greedy for r in expected]


@needs_8
def test_an_abstract_model_on_a_mesh_compiles_with_sharded_params():
    cfg = tiny_model("grid_manager").cfg
    work = GenerateWorkload(rows=2, image_size=(500, 300), prompt_tokens=9, new_tokens=5)
    sharded = compile_generate_for_topology(cfg, "cpu:8", mesh="fsdp=4,tensor=2", workload=work)
    whole = compile_generate_for_topology(cfg, "cpu:1", workload=work)
    assert sharded["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
    assert sharded["hbm_per_chip_gib"] is None and sharded["fits"] is None  # CPU: no HBM to fit
    model = nnx.eval_shape(lambda: LlavaOV(cfg, rngs=nnx.Rngs(0)))
    params = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert sharded["params_gib"] * 2**30 == params
    # The prompts' inputs are about the same per chip either way (pixels replicated; the 2 rows
    # padded to 4 over fsdp=4, a few ids); the parameters are split 8 ways on the mesh (a few small ones whole).
    for program in ("prefill", "score"):
        saved = (whole["programs"][program]["arguments_gib"] - sharded["programs"][program]["arguments_gib"]) * 2**30
        assert 0.6 * params < saved <= params * 7 / 8, program
    assert sharded["cache_slots"] >= sharded["prompt_slots"] + 5


def test_a_program_the_compiler_rejects_is_an_aot_error_naming_it():
    """An XLA option this compiler lacks fails the first program's real compile (prefill and decode):
    an AotError naming them and the devices, with the compiler's own line, not a traceback."""
    cfg = tiny_model("grid_manager").cfg
    work = GenerateWorkload(rows=1, image_size=(64, 64), prompt_tokens=4, new_tokens=2)
    with pytest.raises(AotError) as failure:
        compile_generate_for_topology(cfg, "cpu:1", workload=work,
                                      compiler_options={"xla_manager_jax_no_such_option": True})
    text = str(failure.value)
    assert text.startswith("compiling the prefill and decode programs (") and "for cpu:1 (1 x cpu)" in text
    assert str(failure.value.__cause__).splitlines()[0] in text and "xla_manager_jax_no_such_option" in text


def test_debug_log_level_adds_the_traceback(capsys):
    assert main(["--topology", "cpu:1", "--mesh", "tensor=x"]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert main(["--topology", "cpu:1", "--mesh", "tensor=x", "--log-level", "DEBUG"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("error: ")


@needs_8
def test_cli_reports_memory_per_program_for_the_real_shapes(capsys):
    code = main(["--model", "0.5b:grid_manager", "--topology", "cpu:8", "--mesh", "tensor=2", "--rows", "2",
                 "--new-tokens", "16"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "24 text layers, width 896, bfloat16" in out and "mesh {'data': 1, 'fsdp': 4, 'tensor': 2}" in out
    assert "2 prompt(s) of a 768x768 image + 64 text tokens" in out
    assert "prefill" in out and "decode" in out and "score" in out


def test_cli_errors_are_one_line(capsys):
    assert main(["--model", "13b", "--topology", "cpu:1"]) == 2
    assert "unknown size" in capsys.readouterr().err
    assert main(["--model", "0.5b", "--topology", "cpu:1", "--mesh", "tensor=x"]) == 2
    assert "bad mesh entry" in capsys.readouterr().err
    assert main(["--checkpoint", "no/such/dir", "--topology", "cpu:1"]) == 2
    assert "cannot read the model config" in capsys.readouterr().err
    for size in ("768", "0x5", "100000x100000"):  # the last ran out of memory with a traceback
        with pytest.raises(SystemExit) as exit_:
            main(["--topology", "cpu:1", "--image-size", size])
        assert exit_.value.code == 2 and "argument --image-size: expected WIDTHxHEIGHT" in capsys.readouterr().err
    assert model_config("7b:baseline", "bfloat16").manager.enabled is False


@needs_8
def test_a_mesh_or_workload_the_engine_refuses_is_a_one_line_error(capsys):
    """The engine's own refusals (an fsdp axis of 3 that splits no 0.5B width, a prompt longer than
    the model) come before any compile: one `error:` line and exit 2, as a bad --mesh spec."""
    assert main(["--model", "0.5b", "--topology", "cpu:3"]) == 2  # fsdp=-1 fills 3 devices
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "fsdp=3 divides no dimension of text.embed.embedding" in err and "data=3,fsdp=1" in err
    assert main(["--model", "0.5b", "--topology", "cpu:1", "--prompt-tokens", "40000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "32768" in err


@pytest.mark.slow
@pytest.mark.skipif(not libtpu_available(), reason="libtpu is not installed (pip install 'jax[tpu]==<this jax>'; not in requirements.txt)")
def test_72b_generation_fits_8_v5p_chips_with_tensor_8():
    """The 72B grid + Manager model (136 GiB of bf16 params) served on v5p:2x2x2, run as the CLI does
    (a fresh process: libtpu owns its backend)."""
    cmd = [sys.executable, "run.py", "compile-generate", "--model", "72b:grid_manager", "--topology", "v5p:2x2x2",
           "--mesh", "tensor=8"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stderr[-3000:]
    print(out.stdout)
    assert "80 text layers, width 8192" in out.stdout and "8 x TPU v5" in out.stdout and "-> fits" in out.stdout


def test_the_model_config_can_come_from_a_checkpoint_directory(tmp_path):
    """`--checkpoint DIR` takes the model config written beside the params; no weights are read."""
    import json

    from manager_jax.params_io import CONFIG_FILE, PARAMS_ITEM

    cfg = tiny_model("grid_manager").cfg
    (tmp_path / PARAMS_ITEM).mkdir()  # an empty params item: reading any weight would fail
    (tmp_path / CONFIG_FILE).write_text(json.dumps(cfg.to_dict()))
    got = model_config(None, "bfloat16", str(tmp_path))
    assert got.text == cfg.text and got.manager == cfg.manager and got.dtype == "bfloat16"
    report = compile_generate_for_topology(got, "cpu:1", workload=GenerateWorkload(image_size=(64, 64), new_tokens=4))
    assert report["model"] == f"{cfg.text.num_layers} text layers, width {cfg.text.hidden_size}, bfloat16"


def _thunks_after_passes(dump_dir) -> str:
    """The thunk sequence XLA made of the decode loop (what the GPU runtime executes), from a dump."""
    (path,) = glob.glob(os.path.join(dump_dir, "*decode_loop*thunk_sequence_after_thunk_passes.txt"))
    with open(path) as f:
        return f.read()


def test_command_buffers_put_the_decode_loops_in_the_cuda_graph(tmp_path):
    """decode_command_buffers: no loop of the decode program is left to the host (compiled for an
    H100 without one: XLA's thunks are those the card would run, the driver being new enough)."""
    _gpu_devices_or_skip("h100:1")
    cfg = tiny_model("grid_manager").cfg
    work = GenerateWorkload(image_size=(64, 64), prompt_tokens=9, new_tokens=5, score_tokens=0)
    thunks = {}
    for on in (False, True):
        dump = str(tmp_path / str(on))
        report = compile_generate_for_topology(cfg, "h100:1", workload=work, decode_command_buffers=on,
                                               compiler_options={"xla_dump_to": dump,
                                                                 "xla_dump_hlo_module_re": ".*decode_loop.*"})
        assert report["decode_command_buffers"] is on and report["decode_check_every"] == 8
        thunks[on] = _thunks_after_passes(dump)
    top_level = {on: re.findall(r"^\d+: (k\w+)", text, re.M) for on, text in thunks.items()}
    # By default the runs of tokens and the single tokens after them are two loops that the host
    # drives (it reads each condition); with command buffers one CUDA graph holds them both.
    assert top_level[False].count("kWhile") == 2
    assert top_level[True] == ["kCommandBuffer"] and thunks[True].count("kWhile") == 2


def test_the_command_buffer_types_are_this_jaxs_defaults(tmp_path):
    """The compile option replaces XLA's list of command buffer types: the engine's must be the
    defaults of the jax installed (plus WHILE), or turning the option on would drop some."""
    devices = _gpu_devices_or_skip("h100:1")
    here = jax.sharding.SingleDeviceSharding(devices[0])
    x = jax.ShapeDtypeStruct((8,), np.float32, sharding=here)

    def double(a):
        return a * 2

    jax.jit(double).lower(x).compile({"xla_dump_to": str(tmp_path), "xla_dump_hlo_module_re": "jit_double"})
    (config,) = glob.glob(str(tmp_path / "*jit_double.config.pbtxt"))
    with open(config) as f:
        defaults = re.findall(r"xla_gpu_enable_command_buffer: (\w+)", f.read())
    assert sorted(defaults) == sorted(XLA_COMMAND_BUFFER_DEFAULTS)


def test_multi_output_fusion_joins_each_residual_add_to_the_next_norm():
    """decode_multi_output_fusion: one kernel fewer per decoded token at each layer boundary but the
    last (the 0.5B model's widths with 4 layers, compiled for an H100 without one)."""
    import argparse

    from benchmarks.gpu_deviceless import compile_decode
    from benchmarks.hlo_traffic import launches
    from benchmarks.shapes import benchmark_model_config
    from manager_jax.train.aot import building_for

    devices = _gpu_devices_or_skip("h100:1")[:1]
    cfg = benchmark_model_config(False, "baseline")
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_layers=4, vocab_size=1024))
    per_token = {}
    for on in (False, True):
        args = argparse.Namespace(rows=2, decode_min_rows=None, decode_attention="auto", decode_check_every=1,
                                  decode_matmul="xla", decode_matmul_kernels="", decode_command_buffers=False,
                                  decode_multi_output_fusion=on, prompt_slots=256, new_tokens=16)
        with building_for(devices):
            per_token[on] = sum(launch.count for launch in launches(compile_decode(args, devices, cfg))
                                if launch.loop_depth)
    # 4 layers: the add kernels after layers 0 and 1 join the next norms; the last boundary's stays.
    assert per_token[False] - per_token[True] == 2, per_token


def test_command_buffers_are_a_gpu_option_that_yields_to_xla_flags(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert decode_compiler_options(True) is None  # this host's CPU: the loops run on the device already
    assert decode_compiler_options(False, True) is None  # and XLA:CPU has no Triton fusions
    with compiling_for("gpu"):
        assert decode_compiler_options(False) is None
        assert decode_compiler_options(False, True) == {MULTI_OUTPUT_FUSION: True}
        types = decode_compiler_options(True)["xla_gpu_enable_command_buffer"].split(",")
        assert types == [*XLA_COMMAND_BUFFER_DEFAULTS, "WHILE"]
        assert InferenceEngine(tiny_model("baseline"), decode_command_buffers=True).decode_command_buffers
        # The user's own choice of types (XLA_FLAGS) is not overridden.
        monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_command_buffer=FUSION")
        assert decode_compiler_options(True) is None
        assert not InferenceEngine(tiny_model("baseline"), decode_command_buffers=True).decode_command_buffers
