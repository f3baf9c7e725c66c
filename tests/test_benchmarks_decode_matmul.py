"""benchmarks/decode_matmul.py on CPU (--tiny, interpret mode): the XLA path, the fused kernels on
their defaults and a varied projection, each checked against fp32, and the picks it prints."""

import json

import pytest

from benchmarks import decode_matmul


def test_tiny_sweep_times_both_paths_and_checks_them(capsys):
    lines = decode_matmul.main(["--tiny", "--rows", "2", "--configs", "16,16,4,1", "--sites", "down"])
    out = capsys.readouterr().out
    assert [(x["path"], x["site"], x["config"]) for x in lines] == \
        [("xla", None, None), ("pallas", None, "32,128,4,3"), ("pallas", "down", "16,16,4,1")]
    assert all(x["correct"] and x["us_per_layer"] > 0 for x in lines)
    # Every layer ran the fused kernels on the Pallas paths, none on XLA's.
    assert [x["fused_layers"] for x in lines] == [0, 2, 2]
    assert [json.loads(x) for x in out.splitlines() if x.startswith("{")] == lines
    assert "fastest matmul kernels (2 rows):" in out


def test_fastest_picks_a_projection_config_only_when_it_beats_the_defaults():
    line = lambda site, config, us, correct=True: dict(rows=2, path="pallas", site=site, config=config,
                                                        us_per_layer=us, correct=correct)
    lines = [line(None, "32,128,4,3", 20.0), line("qkv", "16,128,4,3", 18.0), line("qkv", "64,128,4,3", 19.0),
             line("down", "16,256,4,4", 21.0), line("o", "16,64,2,4", 10.0, correct=False)]
    assert decode_matmul.fastest(lines) == {2: {"qkv": decode_matmul.MatmulConfig(16, 128, 4, 3)}}


def test_bad_arguments_are_usage_errors():
    with pytest.raises(SystemExit, match="matmul config"):
        decode_matmul.main(["--tiny", "--configs", "16,128"])
    with pytest.raises(SystemExit, match="--sites"):
        decode_matmul.main(["--tiny", "--sites", "mlp"])
