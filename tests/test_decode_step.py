"""The fused native decode step (kernels/decode_plan.py + csrc/decode_step.cpp): per-step logits equal the
eager PyTorch model's over many positions, for every Llama-family variant (GQA/MHA, tied/untied heads, RoPE
scalings, a sliding window, q/k/v biases) and every weight format the step reads (fp32, bf16, int8 per
channel and grouped, int4); the runner uses it on the fast path, falls back where it does not apply, and
greedy generation is unchanged."""

from __future__ import annotations

import pytest
import torch

from miaotui import kernels
from miaotui.config import SamplingParams
from miaotui.engine.generate import generate_tokens
from miaotui.engine.prepare import prepare_for_inference
from miaotui.engine.runner import Runner
from miaotui.kernels.decode_plan import NativeDecode
from miaotui.loading import build_model
from miaotui.loading.hf import load_hf_weights, read_hf_config

pytestmark = pytest.mark.skipif(not kernels.available(), reason="native kernels do not build on this machine")

PROMPT = [5, 17, 42, 99, 7, 3, 250, 64]


def tiny(hf_folder, name: str, dtype: torch.dtype = torch.float32):
    path, _ = hf_folder(name)
    return build_model(read_hf_config(path), load_hf_weights(path, dtype), dtype)


def quantize_all(model, bits: int, group: int | None) -> None:
    """Every fused decoder linear and the head to one format (the layout a compressed checkpoint loads into)."""
    from miaotui.compress.quant.qlinear import Int8Linear
    from miaotui.compress.quant.qtensor import quantize_rtn
    from miaotui.compress.quant.swap import swap_linears

    model.fuse()
    qweights = {}
    for name, m in model.named_modules():
        if type(m) is torch.nn.Linear and name.startswith("model.layers."):
            qweights[name] = quantize_rtn(m.weight, bits, group, symmetric=bits == 8)
    swap_linears(model, qweights)
    head = model.lm_head
    model.lm_head = Int8Linear.from_quantized(quantize_rtn(head.weight, 8, None, True))


# int4 steps: activations rounded to int16 (half a unit: 2^-16 of a block's largest value) meet codes up to
# 15 whose zero point is subtracted after the sum, so the rounding error is up to ~2x that of int8's
INT4_TOL = 2e-4


def steps_agree(model, n_steps: int = 24, tol: float = 2e-5, cache_dtype: torch.dtype | None = None) -> None:
    """Prefill, then at each position: the native step's logits (it writes k/v at pos) against the eager
    forward of the same token at the same position (it rewrites k/v there with its own values)."""
    prepare_for_inference(model)
    model.setup_cache(batch=1, max_seq_len=64, dtype=cache_dtype)
    step, why = NativeDecode.build(model)
    assert step is not None, why
    with torch.inference_mode():
        logits = model(torch.tensor([PROMPT]), 0, last_only=True)[:, -1]
        for pos in range(len(PROMPT), len(PROMPT) + n_steps):
            token = logits.float().argmax(-1, keepdim=True)
            native = step(token, pos)
            logits = model(token, pos, last_only=True)[:, -1]
            ref = logits.float()
            torch.testing.assert_close(native, ref, atol=tol * ref.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("arch", ["llama-gqa-untied", "llama-mha-tied", "llama3-rope-scaling",
                                  "llama-linear-rope", "mistral-sliding", "qwen2-bias", "llama-head-dim-64",
                                  "llama-head-dim-128"])
def test_native_step_equals_eager_fp32(hf_folder, arch):
    steps_agree(tiny(hf_folder, arch))  # mistral-sliding: window 16, so positions 8..31 cross it


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (4, 64)])
def test_native_step_equals_eager_quantized(hf_folder, native_preferred, bits, group):
    model = tiny(hf_folder, "qwen2-bias")  # biases on q/k/v exercise the quantized kernels' bias path
    quantize_all(model, bits, group)
    steps_agree(model, tol=INT4_TOL if bits == 4 else 1e-4)


def test_native_step_grouped_int8(hf_folder, native_preferred):
    """Int8Linear with a scale per (row, group of 32 columns): the step reads the 2-D scales."""
    from miaotui.compress.quant.qlinear import Int8Linear

    model = tiny(hf_folder, "llama-gqa-untied")
    quantize_all(model, 8, 32)
    assert all(m.scale.dim() == 2 for m in model.modules() if type(m) is Int8Linear and m is not model.lm_head)
    steps_agree(model, tol=1e-4)


@pytest.mark.parametrize("arch", ["llama-gqa-untied", "mistral-sliding", "llama-head-dim-64"])
@pytest.mark.parametrize("fmt", ["fp32", "int4"])
@pytest.mark.parametrize("n", [6, 9])
def test_several_tokens_in_one_call_equal_the_model_forward(hf_folder, native_preferred, arch, fmt, n):
    """A speculative verify: T tokens at pos .. pos+T-1 attend causally to the cache and to each other
    (9 rows: the dense GEMV's two passes per weight row)."""
    model = tiny(hf_folder, arch)
    if fmt == "int4":
        quantize_all(model, 4, 32)
    prepare_for_inference(model)
    model.setup_cache(batch=1, max_seq_len=64)
    step, why = NativeDecode.build(model)
    assert step is not None, why
    block = torch.tensor([[11, 250, 3, 64, 99, 7, 140, 2, 301][:n]])
    with torch.inference_mode():
        model(torch.tensor([PROMPT * 2]), 0)  # 16 cached positions: the window (16) cuts into them
        native = step(block, 16)
        ref = model(block, 16)[0]
    tol = INT4_TOL if fmt == "int4" else 1e-4
    torch.testing.assert_close(native, ref, atol=tol * ref.abs().max().item(), rtol=tol)


def test_native_step_bf16_weights_and_cache(hf_folder):
    """bf16 weights and a bf16 cache: the step computes in fp32 from them (the eager model rounds every
    activation to bf16), so the reference is the same bf16-rounded weights in an fp32 model, no cache."""
    model = tiny(hf_folder, "llama-gqa-untied", torch.bfloat16)
    prepare_for_inference(model)
    model.setup_cache(batch=1, max_seq_len=64)
    step, why = NativeDecode.build(model)
    assert step is not None, why
    ref_model = tiny(hf_folder, "llama-gqa-untied", torch.bfloat16).float()  # bf16-rounded weights in fp32
    ids = list(PROMPT)
    with torch.inference_mode():
        logits = model(torch.tensor([ids]), 0, last_only=True)[:, -1]
        for pos in range(len(ids), len(ids) + 8):
            ids.append(int(logits.float().argmax()))
            logits = step(torch.tensor([[ids[-1]]]), pos)
            ref = ref_model(torch.tensor([ids]), 0)[:, -1]
            # the cache holds k/v rounded to bf16: a few bf16 ulps of difference
            torch.testing.assert_close(logits, ref, atol=2e-2 * ref.abs().max().item(), rtol=2e-2)


def test_runner_fast_path_uses_it_and_generates_the_same_tokens(hf_folder):
    model = tiny(hf_folder, "llama-gqa-untied")
    prepare_for_inference(model)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    plain = Runner(model)  # eager: the reference path
    fast = Runner(model, compile=True)
    want = list(generate_tokens(plain, PROMPT, params))
    got = list(generate_tokens(fast, PROMPT, params))
    assert fast._native is not None and fast.native_reason == ""
    assert got == want


def test_a_new_cache_rebuilds_the_plan(hf_folder):
    model = tiny(hf_folder, "llama-gqa-untied")
    prepare_for_inference(model)
    runner = Runner(model, compile=True)
    with torch.inference_mode():
        for length in (16, 48):
            model.setup_cache(batch=1, max_seq_len=length)
            runner.prefill(torch.tensor([PROMPT]))
            out = runner.decode(torch.tensor([[11]]), len(PROMPT))
            assert runner._native is not None and runner._native.current()
            ref = model(torch.tensor([[11]]), len(PROMPT), last_only=True)[:, -1]
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case,reason", [
    ("gpt2", "no fused step for GPT2"),
    ("int8-kv", "int8 KV cache"),
    ("env-off", "MIAOTUI_NATIVE_STEP=0"),
    ("no-cache", "static KV cache"),
])
def test_where_it_does_not_apply_the_runner_falls_back(hf_folder, monkeypatch, case, reason):
    model = tiny(hf_folder, "gpt2" if case == "gpt2" else "llama-gqa-untied")
    prepare_for_inference(model)
    if case == "env-off":
        monkeypatch.setenv("MIAOTUI_NATIVE_STEP", "0")
    if case != "no-cache":
        model.setup_cache(batch=1, max_seq_len=32, dtype=torch.int8 if case == "int8-kv" else None)
    step, why = NativeDecode.build(model)
    assert step is None and reason in why
    if case == "no-cache":
        return
    runner = Runner(model, compile=False, native=True)  # eager fallback: the result is the model's own
    with torch.inference_mode():
        runner.prefill(torch.tensor([PROMPT]))
        out = runner.decode(torch.tensor([[11]]), len(PROMPT))
        ref = model(torch.tensor([[11]]), len(PROMPT), last_only=True)[:, -1]
    assert runner._native is None and reason in runner.native_reason
    torch.testing.assert_close(out, ref)


def test_a_layout_the_step_cannot_run_falls_back_with_the_reason(hf_folder):
    """Layers with different head counts (a hand-pruned model): the plan's shape check refuses it, and the
    build reports why instead of raising."""
    model = tiny(hf_folder, "llama-gqa-untied")
    prepare_for_inference(model)
    attn = model.model.layers[1].self_attn
    attn.qkv_proj = torch.nn.Linear(attn.qkv_proj.in_features, attn.qkv_proj.out_features - attn.head_dim)
    model.setup_cache(batch=1, max_seq_len=16)
    step, why = NativeDecode.build(model)
    assert step is None and "qkv projection" in why


def test_a_position_outside_the_cache_is_refused(hf_folder):
    """One position past the end, or a block that would run past it."""
    model = tiny(hf_folder, "llama-gqa-untied")
    prepare_for_inference(model)
    model.setup_cache(batch=1, max_seq_len=16)
    step, _ = NativeDecode.build(model)
    with pytest.raises(RuntimeError, match="outside the KV cache"):
        step(torch.tensor([[1]]), 16)
    with pytest.raises(RuntimeError, match="outside the KV cache"):
        step(torch.tensor([[1, 2, 3]]), 14)
