"""`miaotui bench` end to end on a tiny model: every engine runs in its own process and reports."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from miaotui.bench.engines import decode_bytes


def test_bench_runs_engines_and_ends_with_json(hf_folder, tmp_path):
    path, _ = hf_folder("llama-gqa-untied")
    plot = tmp_path / "bench.png"
    proc = subprocess.run(
        [sys.executable, "-m", "miaotui", "bench", "-m", str(path), "--engines", "miaotui:fp32,hf:fp32,llama.cpp",
         "--no-compile", "--prefill", "16,48", "--decode-tokens", "8", "--repeats", "1", "--threads", "1",
         "--concurrency", "3", "--plot", str(plot)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    engines = [r["engine"] for r in summary["results"]]
    # the tiny llama decodes through the fused native step where the kernels build
    assert engines in (["miaotui fp32 native step", "transformers fp32"], ["miaotui fp32", "transformers fp32"])
    assert any("llama.cpp" in s for s in summary["skipped"])  # a GGUF-only peer says why it is absent
    for r in summary["results"]:
        assert set(r["prefill_tok_s"]) == {"16", "48"} and all(v > 0 for v in r["prefill_tok_s"].values())
        assert r["decode_tok_s"] > 0 and r["ttft_s"] > 0 and r["peak_rss_bytes"] > 0
        assert r["throughput_tok_s"]["3"] > 0
    assert "miaotui fp32" in proc.stdout and plot.stat().st_size > 0


def test_decode_bytes_counts_tied_head_once_and_skips_untied_embedding(hf_folder):
    from miaotui.loading import build_model
    from miaotui.loading.hf import load_hf_weights, read_hf_config

    for name, tied in [("llama-mha-tied", True), ("llama-gqa-untied", False)]:
        path, ref = hf_folder(name)
        model = build_model(read_hf_config(path), load_hf_weights(path, torch.float32), torch.float32)
        every = sum(p.numel() * 4 for p in ref.state_dict().values())
        embed = ref.get_input_embeddings().weight.numel() * 4
        # tied: the state dict lists the shared matrix twice, read once; untied: the embedding is not read
        expected = every - embed
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
        assert decode_bytes(model) == expected
        assert decode_bytes(ref) == expected
