"""The encoder bench on a tiny random BERT: every engine that can run here runs, agrees with miaotui fp32, and
a peer that is absent or cannot read the input is skipped with its reason."""

from __future__ import annotations

import importlib.util
import json

import pytest
from test_bert import TEXTS, folder, sentence_transformers_folder  # noqa: F401

from miaotui.encoder import bench as B

TEXTS8 = TEXTS + ["the capital of france is paris .", "a cat is on the dog", "mat of paris"]


@pytest.fixture
def st_path(folder, tmp_path):
    return sentence_transformers_folder(folder, tmp_path, {"pooling_mode_mean_tokens": True}, normalize=True)[0]


def test_bench_runs_every_engine_and_skips_what_it_cannot(st_path, tmp_path, monkeypatch, capsys):
    from miaotui.cli.main import main

    monkeypatch.setattr(B, "ONNX_CACHE", tmp_path / "onnx")
    ckpt = tmp_path / "w8a8"
    assert main(["compress", "--model", str(st_path), "--recipe", "w8a8-smoothquant", "--output", str(ckpt)]) == 0
    engines = ("miaotui:fp32", f"miaotui:fp32@{ckpt}", "miaotui:bf16", "st:fp32", "ort:fp32", "ort:int8",
               f"st:fp32@{ckpt}", "nope:fp32")
    res = B.bench(TEXTS8, st_path, engines, batch=4, single_texts=2, repeats=1, threads=1)
    r, skipped = res["results"], "\n".join(res["skipped"])
    assert "nope:fp32: unknown engine" in skipped
    if importlib.util.find_spec("sentence_transformers") is not None:  # else it is skipped as not installed
        assert f"st:fp32@{ckpt}: peers cannot read a miaotui checkpoint" in skipped
    assert f"st:fp32@{ckpt}:" in skipped
    assert r["miaotui:fp32"]["mean_cosine_to_first"] == pytest.approx(1.0, abs=1e-6)
    assert r["miaotui:bf16"]["min_cosine_to_first"] > 0.999
    assert 0.97 < r[f"miaotui:fp32@{ckpt}"]["min_cosine_to_first"] < 1 - 1e-7  # really quantized, still close
    for spec, present in [("st:fp32", "sentence_transformers"), ("ort:fp32", "onnxruntime"), ("ort:int8", "onnxruntime")]:
        if importlib.util.find_spec(present) is None or importlib.util.find_spec("onnx") is None and "ort" in spec:
            assert spec in skipped and "not installed" in skipped  # one clear line, no crash
            continue
        floor = 0.9 if spec == "ort:int8" else 0.99999  # the same weights: the same embeddings in fp32
        assert r[spec]["min_cosine_to_first"] > floor, spec
        assert r[spec]["batch4_per_s"] > 0 and r[spec]["batch1_ms"] > 0
    assert "| miaotui:fp32 |" in B.table(res)


def test_cli_bench_dispatches_encoders(st_path, monkeypatch, tmp_path, capsys):
    from miaotui.cli.main import main

    data = tmp_path / "t.txt"
    data.write_text("\n".join(TEXTS8))
    assert main(["bench", "--model", str(st_path), "--engines", "miaotui:fp32,missing:fp32", "--threads", "1",
                 "--repeats", "1", "--data", str(data), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(out["results"]) == ["miaotui:fp32"] and out["skipped"][0].startswith("missing:fp32")
