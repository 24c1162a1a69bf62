"""Quantization algorithms (RTN, GPTQ, AWQ, SmoothQuant) and calibration data, on tiny random layers/models.

Errors are always measured directly (X Wᵀ against X Ŵᵀ), never through the algorithms' own formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from miaotui.compress import calib as calib_mod
from miaotui.compress.calib import data_free_tokens, tokens_from_file
from miaotui.compress.layerwise import ScaleGroup, fake_quantize, layer_stack, restore
from miaotui.compress.quant.awq import awq_layer, quantize_model_awq
from miaotui.compress.quant.gptq import gptq_quantize, quantize_model_gptq
from miaotui.compress.quant.qtensor import quantize_rtn
from miaotui.compress.quant.rtn import quantize_model_rtn
from miaotui.compress.quant.smoothquant import quantize_model_smoothquant
from miaotui.errors import MiaotuiError
from miaotui.loading import load
from miaotui.models.base import RMSNorm


def out_err(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    return float((x @ w.t() - x @ wq.t()).pow(2).sum())


def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Rows with strongly correlated channels of unequal size, like real hidden states; ``seed`` draws new
    rows from one fixed distribution."""
    fixed = torch.Generator().manual_seed(1234)
    mix, noise_scale = torch.randn(d // 4, d, generator=fixed), torch.rand(d, generator=fixed) * 0.3
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d // 4, generator=g) @ mix + torch.randn(n, d, generator=g) * noise_scale


def tiny_model(hf_folder, name: str):
    path, _ = hf_folder(name)
    loaded = load(path)
    loaded.model.fuse()
    return loaded


# ---- RTN

@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (4, None, False), (8, None, True), (3, 16, True)])
def test_rtn_error_within_half_a_step(bits, group, sym):
    w = torch.randn(48, 128) * torch.rand(128) * 2
    qw = quantize_rtn(w, bits, group, sym)
    g = group or 128
    qmin, qmax = (-(2 ** (bits - 1)) + 1, 2 ** (bits - 1) - 1) if sym else (0, 2 ** bits - 1)
    assert qw.q.dtype == torch.int16 and qmin <= int(qw.q.min()) and int(qw.q.max()) <= qmax
    assert qw.scale.shape == (48, 128 // g) and (qw.zero is None) == sym
    step = qw.scale.repeat_interleave(g, dim=1)
    assert ((w - qw.dequantize()).abs() <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("name", ["llama-gqa-untied", "gpt2"])
def test_model_rtn_covers_every_decoder_linear(hf_folder, name):
    model = tiny_model(hf_folder, name).model
    qws = quantize_model_rtn(model, 4, 32)
    modules = dict(model.named_modules())
    expected = {n for n, m in modules.items() if type(m) is nn.Linear and n != "lm_head"}
    assert set(qws) == expected and len(expected) == 2 * 4  # 2 layers x 4 linears (fused)
    for n, qw in qws.items():
        assert torch.equal(qw.q, quantize_rtn(modules[n].weight, 4, 32).q)


# ---- GPTQ

def test_gptq_with_diagonal_hessian_is_rtn():
    """With uncorrelated inputs no error can be compensated: GPTQ must reduce to RTN exactly, act-order too
    (distinct diagonal entries make act-order a real permutation, checking its bookkeeping)."""
    w = torch.randn(32, 128)
    h = torch.diag(torch.rand(128) + 0.5)
    for group in (32, None):
        ref = quantize_rtn(w, 4, group)
        for act_order in (False, True):
            qw = gptq_quantize(w, h, 4, group, act_order=act_order)
            assert torch.equal(qw.q, ref.q) and torch.allclose(qw.scale, ref.scale)


@pytest.mark.parametrize("group", [32, None])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(group, act_order):
    x = correlated_inputs(2048, 128)
    w = torch.randn(64, 128)
    h = 2 * x.t() @ x / x.shape[0]
    rtn = out_err(x, w, quantize_rtn(w, 4, group).dequantize())
    qw = gptq_quantize(w, h, 4, group, act_order=act_order, block_size=32)  # several blocks: lazy updates
    assert qw.group_size == (group or 128) and qw.scale.shape == (64, 128 // (group or 128))
    gptq = out_err(x, w, qw.dequantize())
    assert gptq < 0.7 * rtn, (gptq, rtn)
    # generalises: fresh inputs from the same distribution
    x2 = correlated_inputs(1024, 128, seed=1)
    assert out_err(x2, w, qw.dequantize()) < out_err(x2, w, quantize_rtn(w, 4, group).dequantize())


@pytest.mark.parametrize("group", [32, None])
def test_gptq_int8_symmetric_groups(group):
    """8-bit symmetric, per group or per channel (the Int8Linear formats): RTN exactly under a diagonal
    Hessian, better than RTN on correlated inputs."""
    w = torch.randn(48, 128)
    ref = quantize_rtn(w, 8, group, symmetric=True)
    qw = gptq_quantize(w, torch.diag(torch.rand(128) + 0.5), 8, group, symmetric=True)
    assert qw.zero is None and qw.group_size == (group or 128)
    assert torch.equal(qw.q, ref.q) and torch.allclose(qw.scale, ref.scale)
    x = correlated_inputs(2048, 128)
    qw = gptq_quantize(w, 2 * x.t() @ x / x.shape[0], 8, group, symmetric=True, block_size=32)
    assert int(qw.q.abs().max()) <= 127
    assert out_err(x, w, qw.dequantize()) < 0.7 * out_err(x, w, ref.dequantize())


def test_int8_groups_cut_error_on_blockwise_weights():
    """Rows made of blocks of very different magnitude (GGUF sources: 32-column blocks): group scales
    follow the blocks, a per-row scale spends its range on the largest one."""
    g = torch.Generator().manual_seed(0)
    block_scale = torch.rand(64, 8, generator=g).pow(3).repeat_interleave(32, dim=1)  # (64, 256)
    w = torch.randn(64, 256, generator=g) * block_scale
    err = {gs: (quantize_rtn(w, 8, gs, True).dequantize() - w).pow(2).mean() for gs in (None, 128, 32)}
    assert err[32] < err[128] < err[None] and err[32] < 0.5 * err[None]


# ---- AWQ

def outlier_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, :: d // 4] *= 30  # a few channels carry huge activations, as in real LLMs
    return x


def test_awq_beats_rtn_with_outlier_channels_and_keeps_the_float_function():
    d, out = 128, 96
    torch.manual_seed(0)
    norm = RMSNorm(d)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(d))
        norm.weight[:: d // 4] = 8.0  # outliers live in the norm's weight, as they do in Llama
    lin = nn.Linear(d, out, bias=False)
    x = torch.randn(2048, d)
    w0, xn = lin.weight.detach().clone(), norm(x).detach()
    ref = xn @ w0.t()
    rtn = out_err(xn, w0, quantize_rtn(w0, 3, 32).dequantize())

    grp = ScaleGroup("in", norm, ["lin"])
    qws = awq_layer([grp], {"lin": lin}, {"lin": xn.t() @ xn}, {"lin": xn.abs().mean(0)}, bits=3, group_size=32,
                    clip=False)
    with torch.no_grad():
        assert torch.allclose(lin(norm(x)), ref, rtol=1e-4, atol=1e-4)  # folding alone: same function
        awq = float((F.linear(norm(x), qws["lin"].dequantize()) - ref).pow(2).sum())
    assert awq < 0.8 * rtn, (awq, rtn)


def test_awq_clip_does_not_hurt():
    x = correlated_inputs(1024, 128)
    w = torch.randn(64, 128)
    w[:, 0] *= 10  # one extreme weight per row stretches the grid: clipping should pay off
    lin = nn.Linear(128, 64, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    base = awq_layer([], {"l": lin}, {"l": x.t() @ x}, {}, bits=4, group_size=32, clip=False)["l"]
    clipped = awq_layer([], {"l": lin}, {"l": x.t() @ x}, {}, bits=4, group_size=32, clip=True)["l"]
    assert out_err(x, w, clipped.dequantize()) <= out_err(x, w, base.dequantize()) * (1 + 1e-6)


# ---- whole models: scaling alone keeps the logits; GPTQ/AWQ beat RTN on the calibration data

def calib_ids(n=8, t=48, seed=0):
    return torch.randint(0, 320, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["llama-gqa-untied", "qwen2-bias", "gpt2"])
def test_awq_and_smoothquant_scaling_keep_the_logits(hf_folder, name):
    ids = calib_ids()
    for algo in (quantize_model_awq, quantize_model_smoothquant):
        model = tiny_model(hf_folder, name).model
        with torch.no_grad():
            before = model(ids[:2])
            norms = [p.clone() for n, p in model.named_parameters() if "ln" in n or "layernorm" in n]
            qws = algo(model, ids, progress=False) if algo is quantize_model_smoothquant else \
                algo(model, ids, bits=4, group_size=32, progress=False)
            after = model(ids[:2])
            changed = [p for n, p in model.named_parameters() if "ln" in n or "layernorm" in n]
        assert any(not torch.equal(a, b) for a, b in zip(norms, changed)), "no scale was folded"
        assert torch.allclose(after, before, rtol=1e-4, atol=1e-4), (algo.__name__, (after - before).abs().max())
        assert len(qws) == 8
        if algo is quantize_model_smoothquant:
            assert all(qw.bits == 8 and qw.symmetric and qw.group_size == qw.shape[1] for qw in qws.values())


def logits_error(model, qws, ids) -> float:
    with torch.no_grad():
        ref = model(ids)
        saved = fake_quantize(model, qws)
        try:
            return float((model(ids) - ref).pow(2).mean())
        finally:
            restore(model, saved)


@pytest.mark.parametrize("name", ["llama-gqa-untied", "gpt2"])
def test_gptq_and_awq_beat_rtn_on_a_tiny_model(hf_folder, name):
    ids, held_out = calib_ids(16, 64), calib_ids(4, 64, seed=1)
    model = tiny_model(hf_folder, name).model
    rtn = logits_error(model, quantize_model_rtn(model, 3, 32), held_out)
    gptq = logits_error(model, quantize_model_gptq(model, ids, 3, 32, progress=False), held_out)
    assert gptq < rtn, (gptq, rtn)
    awq_model = tiny_model(hf_folder, name).model
    awq = logits_error(awq_model, quantize_model_awq(awq_model, ids, 3, 32, progress=False), held_out)
    assert awq < rtn, (awq, rtn)


def test_layer_stack_runs_layers_like_the_model(hf_folder):
    """The direct per-layer calls reproduce the model's own forward (positions, rope, no cache)."""
    for name in ("llama3-rope-scaling", "gpt2"):
        model = tiny_model(hf_folder, name).model
        ids = calib_ids(2, 40)
        stack = layer_stack(model)
        with torch.no_grad():
            x = stack.embed(ids)
            for layer in stack.layers:
                x = stack.run(layer, x)
            final = model.model.norm if name != "gpt2" else model.transformer.ln_f
            assert torch.allclose(model.lm_head(final(x)), model(ids), atol=1e-5)


# ---- calibration data

def test_calibration_windows_from_a_file(tmp_path, tokenizer):
    text = " ".join(f"Hello world number {i}, the capital of France is Paris." for i in range(200))
    f = tmp_path / "calib.txt"
    f.write_text(text)
    ids = tokens_from_file(f, tokenizer, n_samples=6, seq_len=32, seed=3)
    assert ids.shape == (6, 32) and ids.dtype == torch.long
    assert torch.equal(ids, tokens_from_file(f, tokenizer, n_samples=6, seq_len=32, seed=3))
    assert not torch.equal(ids, tokens_from_file(f, tokenizer, n_samples=6, seq_len=32, seed=4))
    stream = tokenizer(text, add_special_tokens=False).input_ids
    joined = ",".join(map(str, stream))
    for row in ids.tolist():  # every window is a contiguous piece of the tokenized file
        assert ",".join(map(str, row)) in joined


def test_calibration_file_errors(tmp_path, tokenizer):
    with pytest.raises(MiaotuiError, match="no such calibration file"):
        tokens_from_file(tmp_path / "missing.txt", tokenizer)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(MiaotuiError, match="empty"):
        tokens_from_file(tmp_path / "empty.txt", tokenizer)
    (tmp_path / "short.txt").write_text("Hello world.")
    with pytest.raises(MiaotuiError, match="fewer than one calibration window"):
        tokens_from_file(tmp_path / "short.txt", tokenizer, seq_len=64)


def test_data_free_calibration_is_deterministic_and_cached(hf_folder, tmp_path, monkeypatch):
    loaded = tiny_model(hf_folder, "llama-gqa-untied")
    a = data_free_tokens(loaded, n_samples=3, seq_len=24, seed=0, cache_dir=tmp_path / "a", progress=False)
    assert a.shape == (3, 24) and len(list((tmp_path / "a").iterdir())) == 1
    b = data_free_tokens(loaded, n_samples=3, seq_len=24, seed=0, cache_dir=tmp_path / "b", progress=False)
    assert torch.equal(a, b)  # regenerated from scratch: same text

    def no_generation(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(calib_mod, "_generate", no_generation)
    assert torch.equal(data_free_tokens(loaded, 3, 24, 0, cache_dir=tmp_path / "a", progress=False), a)
    monkeypatch.undo()
    c = data_free_tokens(loaded, n_samples=3, seq_len=24, seed=1, cache_dir=tmp_path / "a", progress=False)
    assert not torch.equal(a, c)
