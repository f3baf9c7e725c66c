"""benchmarks/decode_attention.py on CPU (--tiny: interpret mode): every path it is asked for runs
and is reported; a config that fails is reported as failed, not dropped silently."""

from benchmarks import decode_attention


def test_tiny_run_reports_the_xla_path_and_each_config(capsys):
    lines = decode_attention.main(["--tiny", "--rows", "2", "--configs", "32,4,4,2;64,1,4,1;32,4,4,2,0"])
    out = capsys.readouterr().out
    assert [(x["path"], x.get("key_block"), x.get("peel")) for x in lines] == [
        ("xla", None, None), ("pallas", 32, 1), ("pallas", 64, 1), ("pallas", 32, 0)]
    assert all(x["us_per_layer"] > 0 and x["rows"] == 2 for x in lines)
    assert out.count("| 2 | pallas |") == 3 and "| 2 | pallas | 32 | 4 | 4 | 2 | 0 |" in out and "failed" not in out
    # The fastest config per row count, in the form generate.py --decode-kernels reads.
    from manager_jax.models.decode_attention import KernelConfig, parse_kernel_configs

    best = min((x for x in lines if x["path"] == "pallas"), key=lambda x: x["us_per_layer"])
    picked = parse_kernel_configs(out.split("fastest kernels: ")[1].splitlines()[0])
    assert picked == {2: KernelConfig(best["block"], best["programs"], best["num_warps"], best["num_stages"],
                                      best["peel"])}


def test_a_spent_budget_stops_the_sweep_and_still_reports(capsys):
    """With its budget spent after the first path (XLA's, every row count), the sweep times no
    config, then prints the table and an empty pick instead of failing."""
    lines = decode_attention.main(["--tiny", "--rows", "2,3", "--configs", "32,4,4,2", "--budget-s", "1e-9"])
    out = capsys.readouterr().out
    assert [(x["rows"], x["path"]) for x in lines] == [(2, "xla"), (3, "xla")]
    assert "budget of 1e-09s spent: pallas 32,4,4,2" in out and "fastest kernels: \n" in out


def test_a_config_that_computes_wrongly_is_reported_and_never_picked(capsys, monkeypatch):
    """Fault injection: the kernels with one config return a slightly shifted output. The sweep
    times it, marks it WRONG and picks the other config, even though the wrong one is listed first."""
    from manager_jax.models.decode_attention import KernelConfig
    from manager_jax.models.decode_attention import decode_attention as kernels

    bad = KernelConfig(32, 4, 4, 2)

    def shifted(*a, config, **k):
        out, kc, vc = kernels(*a, config=config, **k)
        return (out + 0.5 if config == bad else out), kc, vc

    monkeypatch.setattr(decode_attention, "decode_attention", shifted)
    lines = decode_attention.main(["--tiny", "--rows", "2", "--configs", "32,4,4,2;64,1,4,1"])
    out = capsys.readouterr().out
    assert [(x["path"], x["correct"]) for x in lines] == [("xla", True), ("pallas", False), ("pallas", True)]
    assert "WRONG, max error" in out and "fastest kernels: 2:64,1,4,1\n" in out


def test_a_timed_call_runs_every_layer_once_per_pass():
    """time_block divides by layers x passes: each call must run the step that many times on the
    device (a loop the compiler shortened would report kernels faster than they are)."""
    import jax
    import jax.numpy as jnp

    calls = []

    def counted(*args, layer, **kw):
        jax.debug.callback(lambda: calls.append(layer))
        return decode_attention.xla_step(*args, layer=layer, **kw)

    layers, passes, repeats = 2, 3, 2
    token, k, v, q_seg, seg = decode_attention.workload(2, layers, 64, 40, 48, 14, 2, 32, jnp.float32)
    per_layer, k, v = decode_attention.time_block(counted, token, k, v, q_seg, seg, 50, layers, passes, repeats)
    jax.effects_barrier()
    assert per_layer > 0
    assert sorted(calls) == sorted([0, 1] * passes * (1 + repeats))  # the warm-up call and the timed ones
