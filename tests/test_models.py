"""Our model implementations against Hugging Face transformers on tiny random models."""

from __future__ import annotations

import pytest
import torch

from conftest import ARCHS
from miaotui.config import SamplingParams
from miaotui.engine.generate import generate_tokens
from miaotui.loading import build_model
from miaotui.loading.hf import load_hf_weights, read_hf_config

pytestmark = pytest.mark.filterwarnings("ignore")


def ours(path, dtype=torch.float32):
    return build_model(read_hf_config(path), load_hf_weights(path, dtype), dtype)


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_logits_match_transformers(name, hf_folder):
    path, ref = hf_folder(name)
    model = ours(path)
    ids = torch.randint(0, ref.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
        # no cache: the whole sequence at once
        torch.testing.assert_close(model(ids), expected, atol=1e-4, rtol=0)
        # with the cache: a prefill, a chunk, then single-token decode steps
        model.setup_cache(batch=2, max_seq_len=64)
        parts = [model(ids[:, :17], 0), model(ids[:, 17:30], 17)]
        parts += [model(ids[:, p:p + 1], p) for p in range(30, 40)]
        torch.testing.assert_close(torch.cat(parts, dim=1), expected, atol=1e-4, rtol=0)
        # last_only returns just the final position
        model.setup_cache(batch=2, max_seq_len=64)
        torch.testing.assert_close(model(ids, 0, last_only=True), expected[:, -1:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_greedy_32_tokens_match_transformers(name, hf_folder):
    path, ref = hf_folder(name)
    model = ours(path)
    prompt = [5, 17, 42, 99, 7, 3, 250, 12]
    ref.generation_config.eos_token_id = None  # random weights: do not stop early on either side
    ref.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, min_new_tokens=32)
    expected = out[0, len(prompt):].tolist()
    got = list(generate_tokens(model, prompt, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)))
    assert got == expected


def test_sliding_window_is_exercised(hf_folder):
    # the window (16) is shorter than the 40-token test sequence: a plain causal mask would differ
    path, ref = hf_folder("mistral-sliding")
    model = ours(path)
    model.model.layers[0].self_attn.window = None
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(ids) - ref(ids).logits).abs().max() > 1e-3


def test_bf16_close_to_fp32(hf_folder):
    path, _ = hf_folder("llama-gqa-untied")
    m32, m16 = ours(path), ours(path, torch.bfloat16)
    assert next(m16.parameters()).dtype == torch.bfloat16
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = m32(ids), m16(ids).float()
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


def test_tied_embeddings_share_storage(hf_folder):
    path, _ = hf_folder("llama-mha-tied")
    model = ours(path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    path, _ = hf_folder("llama-gqa-untied")
    model = ours(path)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_sharded_checkpoint_loads(hf_folder):
    path, ref = hf_folder("qwen2-bias", max_shard_size="100KB")
    assert len(list(path.glob("*.safetensors"))) > 1 and (path / "model.safetensors.index.json").is_file()
    model = ours(path)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_fused_projections_and_tensor_positions_match(name, hf_folder):
    """The fast path (fused q/k/v + gate/up, positions as tensors over the whole cache) is the same math."""
    path, ref = hf_folder(name)
    model = ours(path)
    model.fuse()
    ids = torch.randint(0, ref.config.vocab_size, (1, 36), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = ref(ids).logits
        model.setup_cache(batch=1, max_seq_len=64)
        parts = [model(ids[:, :20], 0)] + [model(ids[:, p:p + 1], torch.tensor(p)) for p in range(20, 36)]
    torch.testing.assert_close(torch.cat(parts, dim=1), expected, atol=1e-4, rtol=0)


def test_compiled_decode_matches_eager(hf_folder):
    from miaotui.engine.runner import Runner

    path, _ = hf_folder("llama-gqa-untied")
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompt = [5, 17, 42, 99, 7]
    eager = list(generate_tokens(ours(path), prompt, params))
    fast = ours(path)
    fast.fuse()
    runner = Runner(fast, compile=True, native=False)  # the compiled graph (the fused native step: test_decode_step)
    assert list(generate_tokens(runner, prompt, params)) == eager
    assert runner.compile_s > 0
