"""Ahead-of-time compilation of the train step (`run.py compile`)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import SingleDeviceSharding

from manager_jax.sharding import MeshConfig, make_mesh
from manager_jax.train.aot import (AotError, compile_for_topology, compile_or_refusal, compile_time_oom,
                                   condense_compiler_message, fits_chip, format_report, gpu_memory_gib, host_batch,
                                   libtpu_available, libtpu_pin_problem, memory_per_chip, refused_line, topology_devices,
                                   ways_to_fit)
from manager_jax.train.recipe import load_recipe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_libtpu_other_than_the_one_jax_pins_is_named_with_the_install_that_fixes_it():
    requires = ["jaxlib<=0.10.2,>=0.10.2", 'libtpu==0.0.42.*; extra == "tpu"', 'requests; extra == "tpu"']
    assert libtpu_pin_problem("0.0.42.1", requires) is None
    assert libtpu_pin_problem("0.0.42", requires) is None
    problem = libtpu_pin_problem("0.0.52", requires)
    assert "libtpu 0.0.52" in problem and "0.0.42.*" in problem and f'"jax[tpu]=={jax.__version__}"' in problem
    assert libtpu_pin_problem("0.0.420", requires) is not None  # 0.0.42.* is not a prefix match on text
    assert libtpu_pin_problem("0.0.17", ['libtpu==0.0.17; extra == "tpu"']) is None
    assert libtpu_pin_problem("0.0.52", ["numpy>=2"]) is None  # nothing pinned: nothing to say
    # The jax installed here pins one; the libtpu installed beside it (if any) is judged against it.
    from importlib import metadata
    assert any(r.startswith("libtpu") for r in metadata.requires("jax"))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py)")
def test_compile_for_local_cpu_devices_reports_memory_and_flops(tmp_path):
    # Four of the eight devices: the report counts the mesh's (it said 8).
    config = load_recipe(os.path.join(REPO, "configs", "demo.py"), [
        "mesh.fsdp=2", "mesh.tensor=2", "mesh.num_devices=4", "synthetic_records=None", "model.text.num_layers=2",
        "model.vision.num_layers=2", "model.manager.vision_select_layers_end=3", "model.manager.injection_end=2",
    ])
    report = compile_for_topology(config, "cpu:8", hlo_out=str(tmp_path / "step.hlo"))
    assert "ENTRY" in (tmp_path / "step.hlo").read_text() and not list(tmp_path.glob("*.partial"))
    assert report["devices"] == 4 and report["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    assert report["batch"]["shards"] == 2  # batch_shards=-1: one per data-parallel device
    mem = report["memory_per_chip"]
    assert mem["arguments_gib"] > 0 and mem["temporaries_gib"] > 0
    # The state is FSDP-sharded: each device holds well under the full fp32 params + Adam moments.
    full_state_gib = 3 * report["params"] * 4 / 2**30
    assert mem["arguments_gib"] < full_state_gib
    assert report["model_flops_per_step"] > 0
    assert report["attention"] == "xla" and report["attention_kernel_calls"] == 0  # auto: Splash on TPU meshes only
    assert "memory per chip" in format_report(report)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py)")
def test_fsdp_gathers_layer_weights_one_layer_at_a_time():
    """Doubling the text layers must not add the gathered weights of the new layers to the peak.

    The step gathers each layer's FSDP-split weights inside the layer scan (train/step.py
    gather_stacked_layers); gathering the whole stack per micro-step (and making its gradient
    whole) would add at least the new layers' bf16 weights, and in fact about 4x that.
    """

    def compile_with(layers):
        config = load_recipe(os.path.join(REPO, "configs", "demo.py"), [
            "mesh.fsdp=8", "synthetic_records=None", "model.text.vocab_size=1024", "model.image_token_id=1000",
            "model.text.hidden_size=256", "model.text.intermediate_size=4096", "model.text.head_dim=64",
            "model.remat_policy=full", f"model.text.num_layers={layers}",
        ])
        report = compile_for_topology(config, "cpu:8")
        return report["params"], report["memory_per_chip"]["temporaries_gib"] * 2**30

    params_8, temp_8 = compile_with(8)
    params_16, temp_16 = compile_with(16)
    added_bf16_bytes = 2 * (params_16 - params_8)
    assert temp_16 - temp_8 < added_bf16_bytes, (temp_8, temp_16, added_bf16_bytes)


def test_the_tpu_compilers_out_of_memory_refusal_is_a_report_that_does_not_fit():
    """libtpu refuses to compile a step whose temporaries exceed the chip (the 72B recipe on 64 v5p
    chips, in its own words): that is the command's answer, not a crash."""
    message = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total memory required "
               "for HLO temporaries (133.00G) exceeds available HBM (95.73G). HLO module: jit_train_step.")
    assert compile_time_oom(message) == pytest.approx((133.0, 95.73))
    assert compile_time_oom("RESOURCE_EXHAUSTED: out of host memory") is None
    # libtpu's other form of the refusal
    other = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used "
             "17.51G of 15.48G hbm. Exceeded hbm capacity by 2.03G.")
    assert compile_time_oom(other) == pytest.approx((17.51, 15.48))
    assert compile_time_oom("Ran out of memory in memory space vmem. Used 17.51M of 16.00M vmem.") is None
    config = load_recipe(os.path.join(REPO, "configs", "llava_ov.py:stage2_grid_manager_72b"))
    ways = ways_to_fit(config, {"data": 1, "fsdp": 8, "tensor": 8})
    # 8 KV heads already split 8 ways, one row per shard, full remat: only more chips are left.
    assert len(ways) == 1 and ways[0].startswith("more chips")
    assert len(ways_to_fit(config, {"fsdp": 64, "tensor": 1})) == 2  # + --set mesh.tensor=2
    report = {"recipe": "r", "topology": "v5p:4x4x4", "devices": 64, "device_kind": "TPU v5", "mesh": {"fsdp": 8},
              "batch": {}, "params": 10, "trainable_params": 10, "compile_s": 1.0, "hbm_per_chip_gib": 95.73,
              "refused_needs_gib": 133.0, "fits": False, "to_fit": ways}
    text = format_report(report)
    assert "needs 133.00 GiB (arguments and temporaries) of 95.73 GiB HBM -> DOES NOT FIT" in text
    assert "to fit: more chips" in text


def unregistered_ffi_call():
    """A program XLA cannot compile: a custom call to an FFI target nothing registered (XLA looks its
    handler up when it compiles; jax lowers it without asking)."""
    x = jax.ShapeDtypeStruct((4,), jnp.float32)
    call = jax.ffi.ffi_call("manager_jax_test_no_such_target", x)
    return jax.jit(lambda a: call(a)).lower(x)


def test_a_compile_failure_not_for_memory_is_an_aot_error_naming_what_failed(caplog):
    devices = jax.devices("cpu")[:1]
    with caplog.at_level(logging.DEBUG, logger="manager_jax.train.aot"), pytest.raises(AotError) as failure:
        compile_or_refusal(unregistered_ffi_call().compile, "the test program", "cpu:1", devices)
    text, cause = str(failure.value), failure.value.__cause__
    assert isinstance(cause, jax.errors.JaxRuntimeError)
    assert text.startswith(f"compiling the test program for cpu:1 (1 x {devices[0].device_kind}) failed")
    assert str(cause).strip().splitlines()[0] in text and "manager_jax_test_no_such_target" in text
    assert "--log-level DEBUG" in text
    assert str(cause) in caplog.text  # the whole message, at debug level


@pytest.mark.skipif(not libtpu_available(), reason="libtpu is not installed (pip install 'jax[tpu]==<this jax>'; not in requirements.txt)")
def test_libtpus_out_of_memory_refusal_is_returned_not_raised():
    # (not v5e:1x1: with a default of 2x2x1 chips per host, which libtpu takes in some setups, it is refused)
    devices = topology_devices("v5e:2x2")
    x = jax.ShapeDtypeStruct((5 * 2**30,), jnp.float32, sharding=SingleDeviceSharding(devices[0]))  # 20 GiB
    compiled, oom = compile_or_refusal(jax.jit(lambda a: a * 2).lower(x).compile, "a 20 GiB program", "v5e:2x2",
                                       devices)
    assert compiled is None and oom[0] >= 20 and oom[1] < 16


def test_a_long_compiler_message_keeps_its_first_and_key_lines():
    hlo = [f"%fusion.{i} = f32[1024]{{0}} fusion(f32[1024]{{0}} %p.{i}), kind=kLoop" for i in range(200)]
    message = "\n".join([
        "INTERNAL: Mosaic failed to compile TPU kernel: unsupported block shape", "", "The MLIR operation involved:",
        *hlo, "RESOURCE_EXHAUSTED: Ran out of memory in memory space vmem. Used 17.51M of 16.00M vmem.",
        "allocation table " + "x" * 5000 + " Exceeded vmem capacity by 1.51M.",
        "=== Source Location Trace: ===", "learning/45eac/tfrc/runtime/libtpu_init_utils.cc:370",
    ])
    assert compile_time_oom(message) is None  # not the HBM refusal the reports count: an error
    lines = condense_compiler_message(message).splitlines()
    assert lines[0].strip() == "INTERNAL: Mosaic failed to compile TPU kernel: unsupported block shape"
    assert any("Used 17.51M of 16.00M vmem" in line for line in lines)
    assert any(line.startswith("  allocation table") and line.endswith("Exceeded vmem capacity by 1.51M.")
               for line in lines)
    assert max(len(line) for line in lines) < 400 and len(lines) < 10
    assert sum("%fusion." in line for line in lines) <= 1  # the HLO is left out (past the first lines)
    assert not any("Source Location" in line or ".cc:370" in line for line in lines)
    meaningful = 2 + len(hlo) + 2  # all but the blank line and the compiler's source location
    assert lines[-1].strip() == f"... ({meaningful - (len(lines) - 1)} more lines)"


def test_one_row_per_shard_suggestion_scales_the_crop_and_image_token_capacities():
    """The 0.5B stage-2 recipe sizes a shard batch's crops (74) and image tokens (32,768) for its
    2 rows. `--set data.rows_per_host=1` alone kept them: its v5e:4x4 step needed more memory than
    2 rows (17.16 against 16.32 GiB), since the tower still ran 74 crop slots per row and the
    step's pixel input doubled with the accumulation steps. The suggestion must keep them per row."""
    config = load_recipe(os.path.join(REPO, "configs", "llava_ov.py:stage2_grid_manager_0.5b"))
    [way] = [w for w in ways_to_fit(config, {"data": 1, "fsdp": 16, "tensor": 1}) if "rows_per_host" in w]
    overrides = [part.strip() for part in way.split("(")[0].split("--set") if part.strip()]
    smaller = load_recipe(os.path.join(REPO, "configs", "llava_ov.py:stage2_grid_manager_0.5b"), overrides)
    assert smaller.data.rows_per_host == 1
    assert smaller.data.max_crops * config.data.rows_per_host == config.data.max_crops
    assert smaller.data.max_image_tokens * config.data.rows_per_host == config.data.max_image_tokens


def test_compile_cli_errors_are_one_line_not_a_traceback():
    out = subprocess.run([sys.executable, "run.py", "compile", "--config", "configs/demo.py", "--topology", "v9z:2x2"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    # (libtpu, where installed, prints its own warnings first)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert out.returncode == 2 and len(errors) == 1 and "Traceback" not in out.stderr, out.stderr


@pytest.mark.slow  # two compiles of the demo step, about 30 s on 2 CPU cores
@pytest.mark.skipif(not libtpu_available(), reason="libtpu is not installed (pip install 'jax[tpu]==<this jax>'; not in requirements.txt)")
def test_compiling_for_a_tpu_slice_stores_nothing_in_the_persistent_cache(tmp_path):
    """A program compiled for compile-only devices cannot be loaded back: a cached one only made the
    next `run.py compile` warn ("Error reading persistent compilation cache entry") and compile
    again. Local CPU topologies keep theirs."""
    cache = tmp_path / "cache"
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_COMPILATION_CACHE_DIR": str(cache)}
    cmd = [sys.executable, "run.py", "compile", "--config", "configs/demo.py", "--topology", "v5p:2x2x1"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "x TPU v5" in out.stdout, out.stderr[-3000:]
    assert not cache.exists() or not os.listdir(cache)
    out = subprocess.run([*cmd[:-1], "cpu:1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert any(name.startswith("jit_train_step") for name in os.listdir(cache))


def test_bad_topologies_fail_clearly():
    with pytest.raises(AotError, match="expected like"):
        topology_devices("v5p")
    with pytest.raises(AotError, match="CPU devices"):
        topology_devices(f"cpu:{jax.device_count() + 1}")
    for bad in ("cpu:abc", "cpu:0", "cpu:-2"):
        with pytest.raises(AotError, match="'cpu' or 'cpu:N' with N >= 1"):
            topology_devices(bad)
    with pytest.raises(AotError, match="expected like"):
        topology_devices("cpufoo")  # not a CPU topology with a suffix ignored
    assert len(topology_devices("cpu:2")) == 2 and len(topology_devices("cpu")) == len(jax.devices("cpu"))
    if not libtpu_available():
        with pytest.raises(AotError, match="needs libtpu"):
            topology_devices("v5p:2x2x2")


@pytest.mark.slow
@pytest.mark.skipif(not libtpu_available(), reason="libtpu is not installed (pip install 'jax[tpu]==<this jax>'; not in requirements.txt)")
def test_stage2_7b_grid_manager_compiles_for_v5p_and_fits():
    """The real recipe on 8 v5p chips, run as the CLI does (a fresh process: libtpu owns its backend)."""
    cmd = [
        sys.executable, "run.py", "compile", "--config", "configs/llava_ov.py:stage2_grid_manager_7b",
        "--topology", "v5p:2x2x2",  # the recipe's own mesh: fsdp over all 8 chips
    ]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stderr[-3000:]
    print(out.stdout)
    assert "8 x TPU v5" in out.stdout and "-> fits" in out.stdout
    assert "attention: splash" in out.stdout  # auto picks the Splash kernel on TPU


@pytest.mark.slow
@pytest.mark.skipif(not libtpu_available(), reason="libtpu is not installed (pip install 'jax[tpu]==<this jax>'; not in requirements.txt)")
def test_stage2_72b_fits_64_v5p_chips():
    """The 72B recipe's stage 2 on v5p:4x4x4 (fsdp 8 x tensor 8). It fits only because the Manager's
    13-layer features are split over the tensor axis (143.5 GiB of temporaries per chip whole)."""
    cmd = [sys.executable, "run.py", "compile", "--config", "configs/llava_ov.py:stage2_grid_manager_72b",
           "--topology", "v5p:4x4x4"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stderr[-3000:]
    print(out.stdout)
    assert "64 x TPU v5" in out.stdout and "-> fits" in out.stdout


@pytest.mark.slow
@pytest.mark.skipif(not libtpu_available(), reason="libtpu is not installed (pip install 'jax[tpu]==<this jax>'; not in requirements.txt)")
def test_stage2_72b_on_8_v5p_chips_does_not_fit_and_says_so():
    """The same recipe on v5p:2x2x2 (tensor 8, no FSDP): libtpu refuses it for memory. The command
    reports it and exits 1, so a launch script stops there."""
    cmd = [sys.executable, "run.py", "compile", "--config", "configs/llava_ov.py:stage2_grid_manager_72b",
           "--topology", "v5p:2x2x2"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "8 x TPU v5" in out.stdout and "DOES NOT FIT" in out.stdout and "more chips" in out.stdout
    assert "Traceback" not in out.stderr


def _gpu_devices_or_skip(topology: str):
    try:
        return topology_devices(topology)
    except AotError as err:
        assert "jax[cuda12]" in str(err)  # says what to install
        pytest.skip("needs jax's CUDA plugin (compile-only GPUs)")


def test_gpu_memory_to_fit_is_the_allocators_share(monkeypatch):
    total, usable = gpu_memory_gib("NVIDIA H100 80GB HBM3")
    assert 79 < total < 80 and usable == pytest.approx(0.75 * total)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    assert gpu_memory_gib("NVIDIA H100 80GB HBM3")[1] == pytest.approx(0.9 * total)
    assert gpu_memory_gib("TPU v5") is None


def test_gpu_topologies_name_hosts_and_cards():
    with pytest.raises(AotError, match="h100:GPUS or h100:HOSTSxGPUS"):
        topology_devices("h100:2x")
    devices = _gpu_devices_or_skip("h200:2x4")
    assert len(devices) == 8 and {d.process_index for d in devices} == {0, 1}
    assert {(d.platform, d.device_kind) for d in devices} == {("gpu", "NVIDIA H200")}
    total, usable = gpu_memory_gib("NVIDIA H200")
    assert 140 < total < 141 and usable == pytest.approx(0.75 * total)


@pytest.mark.parametrize("tensor", [2, 4])
def test_compile_for_gpus_without_one_makes_the_gpu_choices(tensor):
    """bf16 demo recipe on 2 hosts of 4 H100s: the crops' attention is cuDNN's, as on the cards, and
    the shards' vmap traces (jax's cuDNN batching rule, tests/test_attention.py). On tensor 4 the
    demo's 2 KV heads do not divide: cuDNN gets them whole."""
    _gpu_devices_or_skip("h100:1")
    config = load_recipe(os.path.join(REPO, "configs", "demo.py"), [
        "model.dtype=bfloat16", f"mesh.fsdp={8 // tensor}", f"mesh.tensor={tensor}", "synthetic_records=None",
        "data.pack=False"])  # one sample per row: the text rows take cuDNN too
    report = compile_for_topology(config, "h100:2x4")
    assert report["device_kind"] == "NVIDIA H100 80GB HBM3" and report["devices"] == 8
    assert report["attention"] == "cudnn" and report["attention_kernel_calls"] > 0
    assert report["fits"] is True and "XLA_PYTHON_CLIENT_MEM_FRACTION" in format_report(report)


@pytest.mark.skipif(not libtpu_available(), reason="libtpu is not installed (pip install 'jax[tpu]==<this jax>'; not in requirements.txt)")
def test_multi_host_topology_reports_the_batch_each_host_feeds():
    """v5p:2x2x2 is 2 hosts of 4 chips: with the 0.5B stage-2 mesh (fsdp 8) each host reads 4 of
    the 8 shard batches, 2 rows each, per accumulation step; with tensor 8 (72B) the one shard
    spans both hosts, which each read it whole."""
    devices = topology_devices("v5p:2x2x2")
    mesh = make_mesh(MeshConfig(fsdp=-1), devices)
    assert host_batch(mesh, shards=8, rows=2) == {"hosts": 2, "shards_per_host": 4, "rows_per_host": 8}
    mesh = make_mesh(MeshConfig(fsdp=-1, tensor=8), devices)
    assert host_batch(mesh, shards=1, rows=1) == {"hosts": 2, "shards_per_host": 1, "rows_per_host": 1}
    assert host_batch(make_mesh(MeshConfig(fsdp=-1), jax.devices()[:4]), shards=8, rows=3) == {
        "hosts": 1, "shards_per_host": 8, "rows_per_host": 24}


needs_libtpu = pytest.mark.skipif(not libtpu_available(), reason="libtpu is not installed (pip install 'jax[tpu]==<this jax>'; not in requirements.txt)")


def _v5e_program(argument_gib: float, temporaries_gib: float) -> jax.stages.Lowered:
    """A program for one v5e chip (15.75 GiB HBM) with a donated fp32 argument of `argument_gib`,
    returned doubled (its buffer reused), and `temporaries_gib` of temporaries: a broadcast and
    its sorted copy, both live at once."""
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    sharding = SingleDeviceSharding(topology_devices("v5e:2x2")[0])
    n, rows = int(argument_gib * 2**28), int(temporaries_gib * 2**28 / 2 / 1024)

    def program(x, s):
        spread = jnp.broadcast_to(s, (rows, 1024)) * x[:1024]
        return 2 * x, jnp.sort(spread, axis=1).sum()

    args = [jax.ShapeDtypeStruct((size,), jnp.float32, sharding=sharding) for size in (n, 1024)]
    return jax.jit(program, donate_argnums=0, out_shardings=(sharding, sharding)).lower(*args)


@needs_libtpu
def test_tpu_memory_is_the_programs_peak_and_libtpus_refusal_counts_the_arguments():
    """On TPU the total is what is live at the peak: the donated argument once (its output reuses
    it) plus the temporaries, not argument + output + temporaries. libtpu refuses to compile a
    program over the chip's HBM, and its refusal's "temporaries" include the arguments."""
    mem = memory_per_chip(_v5e_program(2, 4).compile(), "tpu")
    assert mem["total_is_peak"] and mem["aliased_gib"] == pytest.approx(2, abs=0.01)
    assert mem["total_gib"] == pytest.approx(6, abs=0.05)
    assert fits_chip("tpu", [mem["total_gib"]], 15.75) is True
    # 10 + 8 GiB: neither part alone exceeds 15.75 GiB, together they do.
    with pytest.raises(jax.errors.JaxRuntimeError) as err:
        _v5e_program(10, 8).compile()
    needs, hbm = compile_time_oom(str(err.value))
    assert (needs, hbm) == (pytest.approx(18, abs=0.05), pytest.approx(15.75))
    line = refused_line({"refused_needs_gib": needs, "hbm_per_chip_gib": hbm})
    assert line.endswith("needs 18.00 GiB (arguments and temporaries) of 15.75 GiB HBM -> DOES NOT FIT")


def test_the_verdict_off_tpu_compares_the_total_with_the_capacity():
    assert fits_chip("gpu", [50.0, 61.0], 60.0) is False
    assert fits_chip("gpu", [50.0, 59.0], 60.0) is True
    assert fits_chip("gpu", [50.0, None], 60.0) is None  # a program without a memory report
    assert fits_chip("cpu", [1.0], None) is None


@pytest.mark.slow  # one compile of the demo step for 16 v5e chips, about 40 s on 2 CPU cores
@needs_libtpu
def test_a_step_libtpu_compiles_for_v5e_fits_and_its_total_is_the_peak():
    """libtpu's temporaries count more than is live at once: the parts' sum overstates the step
    (for the 0.5B stage-2 recipe on v5e:4x4 it said 19.20 GiB, over the chip, for a step libtpu
    compiled). The report gives the peak and, on TPU, libtpu's verdict."""
    config = load_recipe(os.path.join(REPO, "configs", "demo.py"))
    report = compile_for_topology(config, "v5e:4x4")
    mem = report["memory_per_chip"]
    parts = mem["arguments_gib"] + mem["outputs_gib"] - mem["aliased_gib"] + mem["temporaries_gib"]
    assert mem["total_is_peak"] and 0 < mem["total_gib"] < parts
    assert report["fits"] is True and "(peak;" in format_report(report) and "-> fits" in format_report(report)
