"""eval/: perplexity, KLD and top-1 against independent fp64 computations with transformers; reference
files; LAMBADA accuracy; the CLI."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from miaotui.eval.evaluate import evaluate
from miaotui.eval.reference import ReferenceFileError, ReferenceLogits, compute_reference
from miaotui.loading import load

CTX, N_WIN = 32, 6
FIRST = CTX // 2


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 320, (CTX * N_WIN + 7,), generator=g)  # 7 spare tokens: a dropped partial window


def hf_log_probs(hf_model, ids: torch.Tensor) -> torch.Tensor:
    """fp64 log-probs (W*S, V) of the scored rows, from transformers' own model, window by window."""
    m = copy.deepcopy(hf_model).double()
    rows = []
    with torch.no_grad():
        for w in ids[: CTX * N_WIN].view(N_WIN, CTX):
            logits = m(w[None]).logits[0, FIRST:CTX - 1]
            rows.append(torch.log_softmax(logits, -1))
    return torch.cat(rows)


def targets(ids: torch.Tensor) -> torch.Tensor:
    return ids[: CTX * N_WIN].view(N_WIN, CTX)[:, FIRST + 1:].reshape(-1)


@pytest.mark.parametrize("arch", ["llama-gqa-untied", "gpt2"])
def test_perplexity_equals_transformers_fp64(hf_folder, ids, arch):
    path, hf = hf_folder(arch)
    report = evaluate(load(path), ids, ctx=CTX, windows=None)
    lp = hf_log_probs(hf, ids)
    expected = torch.exp(-lp.gather(1, targets(ids)[:, None]).mean()).item()
    assert report.windows == N_WIN and report.tokens == N_WIN * (CTX - 1 - FIRST)
    assert report.perplexity == pytest.approx(expected, rel=1e-5)
    assert report.kld_mean is None and report.top1_agreement is None


def test_model_against_itself(hf_folder, ids):
    loaded = load(hf_folder("llama-mha-tied")[0])
    r = evaluate(loaded, ids, ctx=CTX, reference=loaded)
    assert r.kld_mean == pytest.approx(0, abs=1e-12) and r.kld_max == pytest.approx(0, abs=1e-12)
    assert r.top1_agreement == 1.0
    assert r.reference_perplexity == pytest.approx(r.perplexity, rel=1e-12)


@pytest.fixture(scope="module")
def perturbed(hf_folder, tmp_path_factory):
    """(reference path, reference HF model, perturbed path, perturbed HF model)."""
    path, hf = hf_folder("qwen2-bias")
    other = copy.deepcopy(hf)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    out = tmp_path_factory.mktemp("perturbed")
    other.save_pretrained(out)
    from conftest import make_tokenizer

    make_tokenizer().save_pretrained(out)
    return path, hf, out, other


def test_kld_against_perturbed_copy_equals_fp64(perturbed, ids):
    ref_path, ref_hf, path, hf = perturbed
    r = evaluate(load(path), ids, ctx=CTX, reference=load(ref_path))
    p_lp, q_lp = hf_log_probs(ref_hf, ids), hf_log_probs(hf, ids)
    kld = (p_lp.exp() * (p_lp - q_lp)).sum(-1).numpy()
    same = (p_lp.argmax(-1) == q_lp.argmax(-1)).double().mean().item()
    assert kld.mean() > 1e-4  # the perturbation is visible
    assert r.kld_mean == pytest.approx(kld.mean(), rel=1e-4)
    assert r.kld_p99 == pytest.approx(np.percentile(kld, 99), rel=1e-3)
    assert r.kld_max == pytest.approx(kld.max(), rel=1e-3)
    assert abs(r.top1_agreement - same) <= 1 / kld.size + 1e-12  # at most one fp32-vs-fp64 near tie
    assert r.reference_perplexity == pytest.approx(torch.exp(-p_lp.gather(1, targets(ids)[:, None]).mean()).item(),
                                                   rel=1e-5)


def test_reference_file_save_and_reuse(perturbed, ids, tmp_path):
    ref_path, _, path, _ = perturbed
    model, ref_model = load(path), load(ref_path)
    windows = ids[: CTX * N_WIN].view(N_WIN, CTX)
    live = evaluate(model, windows, reference=ref_model)
    ref = compute_reference(ref_model.model, windows, meta={"reference": "ref"})
    ref.save(tmp_path / "ref.safetensors")
    again = ReferenceLogits.load(tmp_path / "ref.safetensors")
    a = evaluate(model, windows, reference=ref).to_dict()
    b = evaluate(model, windows, reference=again).to_dict()
    c = evaluate(model, reference=again).to_dict()  # the file's own windows
    for key in ("perplexity", "kld_mean", "kld_p99", "top1_agreement", "reference_perplexity"):
        assert a[key] == b[key] == c[key], key
    # fp16 storage, renormalised in fp64, changes KLD only at second order
    assert b["kld_mean"] == pytest.approx(live.kld_mean, rel=1e-3, abs=1e-7)
    assert b["top1_agreement"] == live.top1_agreement
    # against its own saved logits a model is ~0, not 0 ± fp16 rounding
    assert evaluate(ref_model, windows, reference=again).kld_mean < 1e-6


def test_reference_file_mismatch_and_corruption(hf_folder, ids, tmp_path):
    loaded = load(hf_folder("llama-gqa-untied")[0])
    windows = ids[: CTX * N_WIN].view(N_WIN, CTX)
    file = tmp_path / "ref.safetensors"
    compute_reference(loaded.model, windows[:3]).save(file)
    ref = ReferenceLogits.load(file)
    with pytest.raises(ReferenceFileError, match="--ctx"):
        evaluate(loaded, ids, ctx=16, reference=ref)
    with pytest.raises(ReferenceFileError, match="other token ids"):
        evaluate(loaded, windows[3:6], reference=ref)
    with pytest.raises(ReferenceFileError, match="only 3"):
        evaluate(loaded, windows, reference=ref)
    with pytest.raises(ReferenceFileError, match="different model"):
        ref.check(fingerprint="0" * 64)
    other = load(hf_folder("gpt2")[0])  # same vocabulary size, other model: tokens still match, fine
    assert evaluate(other, windows[:3], reference=ref).kld_mean > 0
    data = file.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    for name in ("cut", "junk"):
        with pytest.raises(ReferenceFileError, match="corrupt|not a miaotui"):
            ReferenceLogits.load(tmp_path / f"{name}.safetensors")
    with pytest.raises(ReferenceFileError, match="no such"):
        ReferenceLogits.load(tmp_path / "missing.safetensors")


def greedy_items(hf, tok, n_contexts: int = 40) -> tuple[list[str], list[bool]]:
    """LAMBADA lines whose answers come from the model itself (transformers, fp64): for contexts where the
    greedy next token is a space + word, that word (correct) and a word it does not predict (wrong)."""
    m = copy.deepcopy(hf).double()
    words = ["hello", "world", "Paris", "time", "there", "capital"]
    lines, expected = [], []
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _ in range(n_contexts):
            context = " ".join(words[i] for i in torch.randint(0, len(words), (6,), generator=g))
            c_ids = tok(context).input_ids
            best = m(torch.tensor([c_ids])).logits[0, -1].argmax().item()
            piece = tok.decode([best])
            if piece.startswith(" ") and piece[1:].isalpha() and tok(context + piece).input_ids == c_ids + [best]:
                lines.append(context + piece)
                expected.append(True)
            wrong = next(w for w in words if tok(" " + w).input_ids[0] != best)
            full = tok(context + " " + wrong).input_ids
            n = len(full) - len(c_ids)
            logits = m(torch.tensor([full])).logits[0, len(c_ids) - 1:len(full) - 1]
            lines.append(context + " " + wrong)
            expected.append(bool(torch.equal(logits.argmax(-1), torch.tensor(full[-n:]))))
    return lines, expected


def test_lambada_accuracy_matches_the_models_own_greedy_answers(hf_folder, tmp_path):
    from conftest import make_tokenizer
    from miaotui.eval.tasks import lambada, read_lambada

    # a random model rarely predicts " word" tokens: scale their output rows up so that it often does
    hf = copy.deepcopy(hf_folder("llama-gqa-untied")[1])
    tok = make_tokenizer()
    words = [i for t, i in tok.get_vocab().items() if t.startswith("Ġ") and t[1:].isalpha()]
    with torch.no_grad():
        hf.lm_head.weight[words] *= 4
    hf.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    loaded = load(tmp_path / "model")
    lines, expected = greedy_items(hf, loaded.tokenizer)
    assert 0 < sum(expected) < len(expected), (sum(expected), len(expected))  # both kinds present
    file = tmp_path / "lambada.jsonl"
    file.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    result = lambada(loaded.model, loaded.tokenizer, read_lambada(file), batch_size=5)
    assert result.n == len(lines)
    assert result.accuracy == pytest.approx(sum(expected) / len(expected))


def test_lambada_file_format_errors(tmp_path):
    from miaotui.eval.tasks import TaskDataError, read_lambada

    (tmp_path / "a.jsonl").write_text('{"txt": "no text field"}\n')
    (tmp_path / "b.jsonl").write_text('{"text": "oneword"}\n')
    with pytest.raises(TaskDataError, match=":1: expected a JSON object"):
        read_lambada(tmp_path / "a.jsonl")
    with pytest.raises(TaskDataError, match="last word"):
        read_lambada(tmp_path / "b.jsonl")
    (tmp_path / "c.jsonl").write_text('{"text": "the cat sat on the mat"}\n')
    assert read_lambada(tmp_path / "c.jsonl") == [("the cat sat on the", " mat")]


def test_cli_json_and_reference_file(hf_folder, tmp_path, capsys):
    from miaotui.cli.main import main

    path = str(hf_folder("llama-gqa-untied")[0])
    data = tmp_path / "data.txt"
    data.write_text("The capital of France is Paris. Hello world, hello there! " * 40)
    (tmp_path / "l.jsonl").write_text('{"text": "Hello world, hello there"}\n' * 3)
    ref = tmp_path / "ref.safetensors"
    common = ["eval", "--model", path, "--data", str(data), "--ctx", "32", "--windows", "3", "--json"]
    assert main(common + ["--reference", path, "--reference-logits", str(ref),
                          "--task", "lambada", str(tmp_path / "l.jsonl")]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ref.is_file()
    assert first["kld_mean"] == pytest.approx(0, abs=1e-6) and first["top1_agreement"] == 1.0
    assert first["lambada_n"] == 3 and 0 <= first["lambada_accuracy"] <= 1
    assert main(common + ["--reference-logits", str(ref)]) == 0  # reused: no --reference needed
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {k: second[k] for k in ("perplexity", "kld_mean", "kld_p99", "top1_agreement")} == \
        {k: first[k] for k in ("perplexity", "kld_mean", "kld_p99", "top1_agreement")}
    assert main(common + ["--ctx", "16", "--reference-logits", str(ref)]) == 1
    assert "--ctx 32, this run uses 16" in capsys.readouterr().err
    assert main(common + ["--reference-logits", str(tmp_path / "none.safetensors")]) == 1
    assert "give --reference" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_default_model_two_windows(tmp_path):
    """The embedded model: PPL equals transformers' on the same GGUF weights and windows; saved reference
    logits reproduce the live comparison."""
    from miaotui.eval.data import text_windows

    try:
        loaded = load(None)
    except Exception as e:
        pytest.skip(str(e))
    pytest.importorskip("accelerate")
    try:
        windows, _ = text_windows(loaded.tokenizer, None, 512, 2)
    except Exception as e:
        pytest.skip(str(e))
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(loaded.path.parent), gguf_file=loaded.path.name,
                                              dtype=torch.float32).eval()
    with torch.no_grad():
        lp = torch.log_softmax(hf(windows).logits[:, 256:511].double(), -1)
    expected = torch.exp(-lp.gather(2, windows[:, 257:, None]).mean()).item()
    live = evaluate(loaded, windows, reference=loaded)
    assert live.perplexity == pytest.approx(expected, rel=1e-3)
    assert live.kld_mean == pytest.approx(0, abs=1e-12) and live.top1_agreement == 1.0
    ref = compute_reference(loaded.model, windows)
    ref.save(tmp_path / "ref.safetensors")
    saved = evaluate(loaded, reference=ReferenceLogits.load(tmp_path / "ref.safetensors"))
    assert saved.perplexity == live.perplexity and saved.top1_agreement == 1.0 and saved.kld_mean < 1e-6
