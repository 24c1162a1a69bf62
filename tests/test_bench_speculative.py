"""`miaotui bench speculative` end to end on a tiny model: every engine must reproduce plain greedy output."""

from __future__ import annotations

import json

from miaotui.bench.speculative import grounded_prompt, wikitext_detokenize
from miaotui.cli.main import main


def test_wikitext_detokenize():
    raw = "He had a guest @-@ starring role , in 2000 . It cost $ 1 @,@ 000 ( about 3 @.@ 5 % ) ."
    assert wikitext_detokenize(raw) == "He had a guest-starring role, in 2000. It cost $ 1,000 (about 3.5 %)."


def test_grounded_prompt_quotes_the_paragraph(tmp_path):
    text = "Alice Walker wrote books . " + "Walker lived in Georgia and Walker wrote more . " * 10
    f = tmp_path / "t.txt"
    f.write_text("short line\n\n" + text + "\n")
    content = grounded_prompt(f)[0]["content"]
    assert content.startswith("Replace the name Walker with Smith")
    assert "Alice Walker wrote books. Walker lived in Georgia" in content


def test_bench_speculative_json(hf_folder, capsys, tmp_path):
    path, _ = hf_folder("llama-gqa-untied")
    data = tmp_path / "para.txt"
    data.write_text("Hello world , hello there ! " * 12 + "\n")  # 60 words: short enough for a 512-token context
    code = main(["bench", "speculative", "-m", str(path), "--data", str(data), "--no-compile", "--repeats", "1",
                 "--spec-max-tokens", "12", "--num-speculative", "3", "--draft", str(hf_folder("llama-mha-tied")[0]),
                 "--threads", "1", "--json"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0
    engines = [r["engine"] for r in summary["results"]]
    # the tiny llama decodes through the fused native step where the kernels build (nothing to compile)
    assert engines[0] in ("plain (native step)", "plain (eager)") and len(engines) == 3
    assert any("prompt lookup" in e for e in engines)
    assert all(r["same_output"] for r in summary["results"])
    assert all(r["decode_tok_s"] > 0 for r in summary["results"])
