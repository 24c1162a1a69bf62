"""The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers on the same file."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from miaotui.bench.prompts import default_data_file

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]
DATA = default_data_file()


@pytest.fixture(scope="module")
def default_path():
    from miaotui.loading import default_model_path

    try:
        return default_model_path()
    except Exception as e:  # the package is installed by `make`; say so instead of failing obscurely
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def ours(default_path):
    from miaotui.loading import load

    return load(default_path)


@pytest.fixture(scope="module")
def reference(default_path):
    pytest.importorskip("accelerate")  # transformers' GGUF loader needs it
    from transformers import AutoModelForCausalLM

    # transformers dequantizes the same file with its own name map and Q/K un-permutation
    return AutoModelForCausalLM.from_pretrained(str(default_path.parent), gguf_file=default_path.name,
                                                dtype=torch.float32).eval()


def wikitext_ids(tokenizer, n: int) -> list[int]:
    if DATA is None:
        pytest.skip("the WikiText excerpt (shared/data) was not found; set MIAOTUI_DATA_DIR")
    ids = tokenizer(DATA.read_text()).input_ids
    return ids[:n]


def test_logits_agree_with_transformers_on_wikitext(ours, reference):
    ids = torch.tensor([wikitext_ids(ours.tokenizer, 512)])
    with torch.no_grad():
        a, b = ours.model(ids)[0], reference(ids).logits[0]
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert agree >= 0.99, agree
    assert (a - b).abs().max().item() < 1e-2


def test_greedy_matches_transformers(ours, reference):
    from miaotui.config import SamplingParams
    from miaotui.engine.generate import generate_tokens

    prompt = ours.tokenizer("The history of the Roman Empire").input_ids
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, min_new_tokens=32,
                                 pad_token_id=2)
    expected = out[0, len(prompt):].tolist()
    got = list(generate_tokens(ours.model, prompt, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)))
    if got != expected:
        # fp32 summation order may flip a near-tie: allowed only where both tokens are each other's top-2
        i = next(j for j, (x, y) in enumerate(zip(got, expected)) if x != y)
        ctx = torch.tensor([prompt + expected[:i]])
        with torch.no_grad():
            top_ours = ours.model(ctx)[0, -1].topk(2).indices.tolist()
            top_ref = reference(ctx).logits[0, -1].topk(2).indices.tolist()
        assert got[i] in top_ref and expected[i] in top_ours, (i, got, expected)
        assert i >= 16, f"diverged early at token {i}"


def test_cli_names_paris():
    proc = subprocess.run([sys.executable, "-m", "miaotui", "generate", "--temperature", "0", "--max-tokens", "16",
                           "The capital of France is"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_chat_template_from_gguf(ours):
    from miaotui.loading.tokenizer import encode_chat

    ids = encode_chat(ours.tokenizer, [{"role": "user", "content": "Hi"}])
    text = ours.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert ours.eos_token_ids == {2}
