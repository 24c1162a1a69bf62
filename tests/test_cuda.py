"""The same code on a CUDA GPU: logits against transformers on the GPU, generation equal to the CPU's.

Skipped where PyTorch sees no GPU (CI); run on a GPU machine with ``pytest -q tests/test_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch

from miaotui import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")

IDS = [5, 77, 123, 9, 200, 31, 64, 250, 18, 3, 99, 141]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(autouse=True)
def exact_matmuls():
    # TF32 would make GPU matmuls differ from fp32 references by ~1e-3
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("arch", ["llama-gqa-untied", "mistral-sliding", "qwen2-bias", "gpt2"])
def test_logits_match_transformers_on_gpu(hf_folder, arch):
    path, hf = hf_folder(arch)
    llm = LLM(str(path), device="cuda")
    assert llm.loaded.model.device.type == "cuda"
    ids = torch.tensor([IDS], device="cuda")
    with torch.no_grad():
        ours = llm.loaded.model(ids, 0)
        ref = hf.to("cuda")(ids).logits
    hf.to("cpu")
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_greedy_generation_equals_cpu_single_and_batched(hf_folder):
    path, _ = hf_folder("llama-gqa-untied")
    prompts = ["The capital of France is", "Hello world", "Once upon a time 秒推"]
    cpu = [LLM(str(path), device="cpu").generate(p, GREEDY).text for p in prompts]
    gpu = LLM(str(path), device="cuda")
    assert [gpu.generate(p, GREEDY).text for p in prompts] == cpu
    assert [c.text for c in gpu.generate(prompts, GREEDY)] == cpu  # continuous batching, paged cache


def test_seeded_sampling_and_speculative_on_gpu(hf_folder):
    path, _ = hf_folder("llama-gqa-untied")
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=3, max_tokens=16, ignore_eos=True)
    llm = LLM(str(path), device="cuda")
    assert llm.generate("Hello", params).text == llm.generate("Hello", params).text
    spec = LLM(str(path), device="cuda", speculative="ngram")
    prompt = "Hello world, hello there! Hello world, hello"
    assert spec.generate(prompt, GREEDY).text == llm.generate(prompt, GREEDY).text


def test_compiled_decode_on_gpu(hf_folder):
    path, _ = hf_folder("llama-gqa-untied")
    eager = LLM(str(path), device="cuda").generate("Hello world", GREEDY).text
    assert LLM(str(path), device="cuda", compile=True).generate("Hello world", GREEDY).text == eager


@pytest.mark.parametrize("recipe", ["int8", "int4-rtn"])
def test_quantized_checkpoint_runs_on_gpu(hf_folder, tmp_path, recipe):
    from miaotui.compress.recipe import Context, load_recipe, run_recipe
    from miaotui.loading import load
    from miaotui.loading.checkpoint import save_checkpoint, source_identity

    path, _ = hf_folder("llama-gqa-untied")
    loaded = load(path)
    ctx = Context(loaded, progress=False)
    rec = load_recipe(recipe)
    run_recipe(ctx, rec)
    save_checkpoint(tmp_path, loaded.model, loaded.tokenizer, loaded.config, ctx.modules, rec,
                    source_identity(loaded.path))
    cpu, gpu = LLM(str(tmp_path), device="cpu"), LLM(str(tmp_path), device="cuda")
    ids = torch.tensor([IDS])
    with torch.no_grad():
        want = cpu.loaded.model(ids, 0)
        got = gpu.loaded.model(ids.cuda(), 0).cpu()
    # the CPU packed kernels may round activations to bf16: compare as a quantized model is compared
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    assert gpu.generate("Hello world", SamplingParams(temperature=0, max_tokens=8)).stats.completion_tokens >= 1


def test_bf16_on_gpu_close_to_fp32(hf_folder):
    path, _ = hf_folder("llama-gqa-untied")
    ids = torch.tensor([IDS], device="cuda")
    with torch.no_grad():
        fp32 = LLM(str(path), device="cuda").loaded.model(ids, 0).float()
        bf16 = LLM(str(path), dtype="bf16", device="cuda").loaded.model(ids, 0).float()
    assert (fp32 - bf16).abs().max() < 0.05 * fp32.abs().max()
