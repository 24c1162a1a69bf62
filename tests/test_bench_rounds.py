"""`miaotui bench --rounds N`: the engine list in rotated order each round, each figure's median kept."""

from __future__ import annotations

import statistics
import subprocess
import sys

from miaotui.bench.rounds import merge, rotated, run_rounds


def test_rotation_starts_each_round_at_the_next_engine():
    specs = ["a", "b", "c"]
    assert [rotated(specs, r) for r in range(4)] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"],
                                                    ["a", "b", "c"]]
    assert rotated([], 3) == []


def test_merge_takes_medians_of_measurements_and_the_worst_peak_rss():
    runs = [{"engine": "x", "decode_tok_s": d, "prefill_tok_s": {"128": p}, "peak_rss_bytes": rss, "repeats": 3,
             "throughput_tok_s": {"32": t}} for d, p, rss, t in
            [(80.0, 1000.0, 5, 290.0), (99.0, 1200.0, 7, 300.0), (90.0, 900.0, 6, 310.0)]]
    out = merge(runs)
    assert out["engine"] == "x" and out["repeats"] == 3
    assert out["decode_tok_s"] == statistics.median([80.0, 99.0, 90.0]) == 90.0
    assert out["prefill_tok_s"] == {"128": 1000.0}
    assert out["throughput_tok_s"] == {"32": 300.0}
    assert out["peak_rss_bytes"] == 7
    assert [r["decode_tok_s"] for r in out["rounds"]] == [80.0, 99.0, 90.0]
    assert "rounds" not in merge(runs[:1])  # one round: the result as the worker printed it


def test_run_rounds_alternates_engines_and_drops_one_that_fails():
    calls = []

    def run_one(spec):
        calls.append(spec)
        if spec == "bad" and calls.count("bad") == 2:  # fails in its second round
            return None
        return {"engine": spec, "decode_tok_s": float(len(calls))}

    results = run_rounds(["a", "bad", "c"], 3, run_one)
    assert calls == ["a", "bad", "c", "bad", "c", "a", "c", "a"]
    assert [r["engine"] for r in results] == ["a", "c"]
    # each engine's median over its rounds: a ran 1st, 6th and 8th; c 3rd, 5th and 7th
    assert results[0]["decode_tok_s"] == 6.0 and results[1]["decode_tok_s"] == 5.0


def test_rounds_must_be_positive():
    proc = subprocess.run([sys.executable, "-m", "miaotui", "bench", "--rounds", "0"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "--rounds: must be at least 1" in proc.stderr
