"""benchmarks/decode_attention.py on CPU (--tiny: interpret mode): every path it is asked for runs
and is reported; a config that fails is reported as failed, not dropped silently."""

from benchmarks import decode_attention


def test_tiny_run_reports_the_xla_path_and_each_config(capsys):
    lines = decode_attention.main(["--tiny", "--rows", "2", "--configs", "32,4,4,2;64,1,4,1"])
    out = capsys.readouterr().out
    assert [(x["path"], x.get("key_block")) for x in lines] == [("xla", None), ("pallas", 32), ("pallas", 64)]
    assert all(x["us_per_layer"] > 0 and x["rows"] == 2 for x in lines)
    assert out.count("| 2 | pallas |") == 2 and "failed" not in out
