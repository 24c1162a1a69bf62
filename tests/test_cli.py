"""The CLI end to end on a tiny model folder: output format, errors, inspect."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from miaotui.cli.main import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_json_last_line(hf_folder, capsys):
    path, _ = hf_folder("llama-gqa-untied")
    code, out, _ = run_cli(capsys, "generate", "The capital of France is", "-m", str(path), "-t", "0",
                           "-n", "12", "--ignore-eos", "--json")
    assert code == 0
    lines = out.rstrip("\n").split("\n")
    stats = json.loads(lines[-1])
    for key in ("text", "prompt_tokens", "completion_tokens", "finish_reason", "ttft_s", "prefill_tok_s",
                "decode_tok_s"):
        assert key in stats
    assert stats["completion_tokens"] == 12 and stats["finish_reason"] == "length"
    assert stats["prompt_tokens"] == 5
    assert out.startswith(stats["text"])  # the streamed text is the same text


def test_generate_greedy_is_reproducible_and_matches_library(hf_folder, capsys):
    from miaotui import LLM, SamplingParams

    path, _ = hf_folder("qwen2-bias")
    args = ("generate", "Hello world", "-m", str(path), "-t", "0", "-n", "10", "--ignore-eos", "--json")
    a = json.loads(run_cli(capsys, *args)[1].splitlines()[-1])
    b = json.loads(run_cli(capsys, *args)[1].splitlines()[-1])
    lib = LLM(str(path)).generate("Hello world", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert a["text"] == b["text"] == lib.text


def test_seeded_sampling_reproducible(hf_folder, capsys):
    path, _ = hf_folder("gpt2")
    args = ("generate", "Once upon", "-m", str(path), "-t", "1.0", "-n", "16", "--ignore-eos", "--json")
    a = json.loads(run_cli(capsys, *args, "--seed", "7")[1].splitlines()[-1])
    b = json.loads(run_cli(capsys, *args, "--seed", "7")[1].splitlines()[-1])
    assert a["text"] == b["text"]


def test_stop_string_cuts_output(hf_folder, capsys):
    from miaotui import LLM, SamplingParams

    path, _ = hf_folder("llama-mha-tied")
    llm = LLM(str(path))
    full = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)).text
    assert len(full) > 6
    stop = full[3:5]  # a stop string taken from the real output
    cut = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=(stop,)))
    assert cut.text == full[:full.index(stop)]
    assert cut.stats.finish_reason == "stop"
    code, out, _ = run_cli(capsys, "generate", "Hello", "-m", str(path), "-t", "0", "-n", "24", "--ignore-eos",
                           "--stop", stop, "--json")
    assert json.loads(out.splitlines()[-1])["text"] == cut.text


def test_chat_flag_uses_template(hf_folder, capsys):
    path, _ = hf_folder("llama-gqa-untied")
    code, out, _ = run_cli(capsys, "generate", "hi", "--chat", "--system", "be brief", "-m", str(path),
                           "-t", "0", "-n", "4", "--ignore-eos", "--json")
    stats = json.loads(out.splitlines()[-1])
    from conftest import make_tokenizer

    tok = make_tokenizer()
    templated = tok.apply_chat_template([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                                        tokenize=False, add_generation_prompt=True)
    assert stats["prompt_tokens"] == len(tok(templated, add_special_tokens=False).input_ids)


def test_inspect_json(hf_folder, capsys):
    path, ref = hf_folder("llama-gqa-untied")
    code, out, _ = run_cli(capsys, "inspect", "-m", str(path), "--json")
    info = json.loads(out)
    assert info["model_type"] == "llama" and info["format"] == "hf"
    assert info["parameters"] == sum(p.numel() for p in ref.parameters())
    assert info["kv_heads"] == 2 and info["layers"] == 2 and info["context_length"] == 512
    assert info["tokenizer"]["chat_template"] is True
    assert info["stored_types"] == {"F32": len(ref.state_dict())}


def _error(capsys, *argv) -> str:
    code, out, err = run_cli(capsys, *argv)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_error_missing_path(capsys, tmp_path):
    msg = _error(capsys, "generate", "x", "-m", str(tmp_path / "nope"))
    assert "no such file or directory" in msg


def test_error_corrupt_safetensors(hf_folder, capsys, tmp_path):
    path, _ = hf_folder("llama-gqa-untied")
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    msg = _error(capsys, "generate", "x", "-m", str(bad))
    assert "corrupt or truncated" in msg


def test_error_unknown_architecture(hf_folder, capsys, tmp_path):
    path, _ = hf_folder("llama-gqa-untied")
    bad = tmp_path / "mamba"
    shutil.copytree(path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "mamba"}))
    msg = _error(capsys, "inspect", "-m", str(bad))
    assert "unsupported architecture 'mamba'" in msg and "llama" in msg


def test_error_pickle_only(capsys, tmp_path, hf_folder):
    path, _ = hf_folder("llama-gqa-untied")
    bad = tmp_path / "pickle"
    shutil.copytree(path, bad)
    (bad / "model.safetensors").rename(bad / "pytorch_model.bin")
    assert "pickle" in _error(capsys, "inspect", "-m", str(bad))


def test_error_prompt_too_long(hf_folder, capsys):
    path, _ = hf_folder("gpt2")  # context 512
    msg = _error(capsys, "generate", "Hello world " * 400, "-m", str(path))
    assert "context is 512 tokens" in msg


def test_error_bad_flag_value(hf_folder, capsys):
    path, _ = hf_folder("gpt2")
    assert "top_p" in _error(capsys, "generate", "x", "-m", str(path), "--top-p", "1.5")


def test_debug_shows_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "miaotui", "inspect", "-m", str(tmp_path / "nope"), "--debug"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ModelLoadError" in proc.stderr


def test_every_flag_has_help():
    from miaotui.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "verb")
    for verb, p in sub.choices.items():
        for action in p._actions:
            assert action.help, f"{verb}: {action.option_strings or action.dest} has no help"


def test_chat_session_keeps_history_and_resets(hf_folder):
    """A real `miaotui chat` process driven through stdin: two turns, /reset, a turn, /exit."""
    path, _ = hf_folder("llama-gqa-untied")
    script = "Hello\nHow are you?\n/reset\nHello\n/exit\n"
    proc = subprocess.run([sys.executable, "-m", "miaotui", "chat", "-m", str(path), "-t", "0", "-n", "6",
                           "--ignore-eos"], input=script, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    answers = proc.stdout.split("\n")[:3]
    assert "(conversation reset)" in proc.stderr
    # greedy: the first turn after /reset sees the same conversation as the very first turn
    assert answers[0] == answers[2] and answers[0]
    from miaotui import LLM, SamplingParams

    llm = LLM(str(path))
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    first = llm.generate([{"role": "user", "content": "Hello"}], params).text
    second = llm.generate([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first},
                           {"role": "user", "content": "How are you?"}], params).text
    assert answers[0] == first and answers[1] == second


def test_generate_compile_flag_same_text_and_reports_compile_time(hf_folder, capsys):
    path, _ = hf_folder("gpt2")  # a Llama would decode through the fused native step: nothing to compile
    args = ("generate", "Hello world", "-m", str(path), "-t", "0", "-n", "10", "--ignore-eos", "--json")
    plain = json.loads(run_cli(capsys, *args)[1].splitlines()[-1])
    compiled = json.loads(run_cli(capsys, *args, "--compile")[1].splitlines()[-1])
    assert compiled["text"] == plain["text"]
    assert compiled["compile_s"] > 0 and plain["compile_s"] == 0


@pytest.mark.parametrize("spec", ["ngram", "draft"])
def test_generate_speculative_same_greedy_text(hf_folder, capsys, spec):
    """--speculative (prompt lookup, or a draft model sharing the tokenizer) leaves greedy text unchanged."""
    path, _ = hf_folder("llama-gqa-untied")
    draft = hf_folder("llama-mha-tied")[0] if spec == "draft" else "ngram"
    prompt = "Hello world, hello there! Hello world, hello"
    base = ("generate", prompt, "-m", str(path), "-t", "0", "-n", "24", "--ignore-eos", "--json")
    plain = json.loads(run_cli(capsys, *base)[1].splitlines()[-1])
    fast = json.loads(run_cli(capsys, *base, "--speculative", str(draft), "--num-speculative", "3")[1]
                      .splitlines()[-1])
    assert fast["text"] == plain["text"] and fast["completion_tokens"] == 24
    assert fast["speculative"]["target_forwards"] <= 24 and fast["speculative"]["proposed"] > 0


def test_speculative_draft_with_other_tokenizer_is_refused(hf_folder, tmp_path):
    from transformers import AutoTokenizer

    from miaotui import LLM
    from miaotui.errors import MiaotuiError

    path, _ = hf_folder("llama-gqa-untied")
    other = tmp_path / "other"
    shutil.copytree(path, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra-token>"])
    tok.save_pretrained(other)
    with pytest.raises(MiaotuiError, match="different tokenizer"):
        LLM(str(path), speculative=str(other))


def test_device_choice_is_checked():
    import torch

    from miaotui.device import resolve_device
    from miaotui.errors import MiaotuiError

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(MiaotuiError, match="unknown device"):
        resolve_device("tpu:banana")
    if not torch.cuda.is_available():
        with pytest.raises(MiaotuiError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_compress_chain_records_each_steps_quality(hf_folder, capsys, tmp_path):
    """With --eval, a multi-step recipe records perplexity/KLD/top-1 after every step in the manifest, and
    the last step's figures equal the final report's."""
    path, _ = hf_folder("llama-gqa-untied")
    data = tmp_path / "eval.txt"
    data.write_text("The capital of France is Paris. Hello world, hello there! " * 40)
    recipe = tmp_path / "chain.yaml"
    recipe.write_text("steps:\n  - prune-layers: {count: 1}\n"
                      "  - quantize: {method: rtn, bits: 8, group_size: null, symmetric: true}\n")
    out = tmp_path / "ck"
    code, _, _ = run_cli(capsys, "compress", "-m", str(path), "--recipe", str(recipe), "--output", str(out),
                         "--calib", str(data), "--calib-len", "32", "--calib-samples", "4",
                         "--eval", "--data", str(data), "--ctx", "64", "--windows", "2")
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    records = manifest["recipe"]["records"]
    assert [r["step"] for r in records] == ["prune-layers", "quantize"]
    assert all({"perplexity", "kld_mean", "top1_agreement"} <= r["quality"].keys() for r in records)
    assert records[0]["quality"]["kld_mean"] > 0  # a layer is gone: the model differs from its source
    assert records[-1]["quality"]["perplexity"] == pytest.approx(manifest["quality"]["perplexity"], rel=1e-3)
