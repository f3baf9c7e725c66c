"""benchmarks/generate.py on CPU (--tiny): one JSON line per batch size, with the decode
attention and the kernel config each batch size decoded with."""

import json
import os

import pytest

from benchmarks import generate
from manager_jax.models.decode_attention import KernelConfig


def test_tiny_run_reports_each_batch_with_its_kernel_config(capsys):
    # Repeated --decode-kernels add up, a later one winning for its rows (gpu_session.sh's variants).
    assert generate.main(["--tiny", "--batch", "1,2,3", "--new-tokens", "3", "--decode-attention", "pallas",
                          "--decode-kernels", "2:8,4,4,1;3:16,4,4,1,0", "--decode-kernels", "2:16,4,4,1"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [(x["batch"], x["decode_attention"], x["decode_kernel"]) for x in lines] == \
        [(1, "pallas", str(KernelConfig.default_for(1))), (2, "pallas", "16,4,4,1"),  # batch 1: not listed
         (3, "pallas", "16,4,4,1,0")]
    assert all(x["decode_tokens_per_s"] > 0 and x["prefill_s"] > 0 and x["new_tokens"] == 3 for x in lines)


def test_a_malformed_kernel_config_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        generate.main(["--tiny", "--decode-kernels", "16:64,528"])
    assert "kernel config" in capsys.readouterr().err


def test_the_tokens_digest_is_the_same_for_speed_options_only(capsys):
    """The XLA and the Pallas decode attention make the same tokens (fp32): the same digest; two rows
    make other tokens than one."""
    digests = []
    for attention in ("xla", "pallas"):
        assert generate.main(["--tiny", "--batch", "1,2", "--new-tokens", "3", "--decode-attention", attention]) == 0
        digests.append([json.loads(x)["tokens_sha1"] for x in capsys.readouterr().out.splitlines() if x.startswith("{")])
    assert digests[0] == digests[1] and digests[0][0] != digests[0][1]


def test_decode_xla_options_reach_the_decode_program_alone(capsys, tmp_path):
    """--decode-xla-option (InferenceEngine decode_xla_options): XLA's dump option, given for the
    decode loop, dumps that program and not the prefill's; the run reports the options."""
    dump = tmp_path / "dump"
    assert generate.main(["--tiny", "--batch", "1", "--new-tokens", "3", "--decode-xla-option", f"xla_dump_to={dump}",
                          "--decode-xla-option", "xla_dump_hlo_as_text=true"]) == 0
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert line["decode_xla_options"] == {"xla_dump_to": str(dump), "xla_dump_hlo_as_text": True}
    assert line["first_call_s"] > 0
    programs = {name.split(".")[1] for name in os.listdir(dump) if name.startswith("module_")}
    assert programs == {"jit__decode_loop_fn"}, programs


@pytest.mark.parametrize("option", ["xla_dump_to", "dump_to=x", "XLA_FOO=1"])
def test_a_malformed_xla_option_is_a_usage_error(capsys, option):
    with pytest.raises(SystemExit):
        generate.main(["--tiny", "--decode-xla-option", option])
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_xla_option_values_are_typed():
    from manager_jax.infer.engine import parse_xla_options

    assert parse_xla_options(["xla_a=true", "xla_b=FALSE", "xla_c=16", "xla_d=0.5", "xla_e=FUSION,WHILE", "xla_f="]) == \
        {"xla_a": True, "xla_b": False, "xla_c": 16, "xla_d": 0.5, "xla_e": "FUSION,WHILE", "xla_f": ""}
