"""benchmarks/generate.py on CPU (--tiny): one JSON line per batch size, with the decode
attention and the kernel config each batch size decoded with."""

import json

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
