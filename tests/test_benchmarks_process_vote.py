"""benchmarks/process_vote.py times two ways of voting; both must reach the same decisions (each
worker checks every round's result against the flags it knows were raised) or the timing compares
nothing."""

import json

from benchmarks import process_vote


def test_both_ways_reach_the_right_decisions(capsys):
    assert process_vote.main(["--processes", "2", "--rounds", "9", "--step-ms", "5", "--host-ms", "1"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["processes"] == 2 and report["rounds"] == 9
    for way in ("any_process", "allgather"):
        assert report[way]["vote_ms"] > 0 and report[way]["round_ms"] > 0
