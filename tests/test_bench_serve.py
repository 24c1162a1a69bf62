"""`miaotui bench serve` against the real server (tiny model): its JSON line, failure accounting, the soak mix."""

from __future__ import annotations

import json

from miaotui.bench.serve_load import percentiles
from miaotui.cli.main import main
from miaotui.server.app import ServerConfig
from test_server import ARCH, Running


def test_percentiles_interpolate():
    assert percentiles([]) == {"p50": 0.0, "p90": 0.0, "p99": 0.0}
    p = percentiles([float(x) for x in range(101)])  # 0..100: the q-quantile is 100q
    assert p["p50"] == 50 and p["p90"] == 90 and abs(p["p99"] - 99) < 1e-9


def test_bench_serve_counts_and_soak_mix(hf_folder, capsys):
    s = Running(ServerConfig(model=str(hf_folder(ARCH)[0]), max_num_seqs=4, max_model_len=256, api_key="k"))
    try:
        code = main(["bench", "serve", "--url", s.url, "--api-key", "k", "--concurrency", "1,3", "--requests", "12",
                     "--output-tokens", "8", "--invalid-fraction", "0.3", "--json"])
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    finally:
        s.stop()
    assert code == 0
    assert [lv["concurrency"] for lv in out["levels"]] == [1, 3]
    for lv in out["levels"]:
        assert lv["requests"] == 12 and lv["status_5xx"] == 0 and lv["lost_valid"] == 0
        assert lv["invalid"] > 0 and lv["invalid_answered_4xx"] == lv["invalid"]
        assert lv["completed"] == lv["valid"] and lv["output_tok_s"] > 0
        assert 0 < lv["ttft_s"]["p50"] <= lv["ttft_s"]["p99"] <= lv["e2e_s"]["p99"]
    assert out["rss_start_mb"] > 0  # read from the server's /metrics
