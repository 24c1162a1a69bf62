"""Low-rank factorisation: full-rank SVD (plain and whitened) reproduces the layer; the whitened truncation is
the output-optimal one; ranks follow ratio / energy; a factorised model saves, loads and quantizes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from miaotui.compress.lowrank import (
    FactorizedLinear, choose_rank, factorize_linear, factors, run_lowrank, saves_params, spectrum, whitening_factor,
)
from miaotui.compress.recipe import Context, RecipeError, run_recipe
from miaotui.loading import load
from miaotui.loading.checkpoint import save_checkpoint, source_identity

IDS = torch.tensor([[5, 77, 123, 9, 200, 31, 64, 250, 18, 3, 99, 141]])


def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Inputs with a few outlier channels and correlated directions, like an LLM's activations."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    x[:, :3] *= 20
    return x


@pytest.mark.parametrize("whiten", [False, True])
def test_full_rank_reproduces_the_layer(whiten):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 32, generator=g, dtype=torch.float64)
    x = correlated_inputs(200, 32)
    s = whitening_factor(x.T @ x) if whiten else None
    u, sig, vh = spectrum(w, s)
    a, b = factors(u, sig, vh, 32, s)
    torch.testing.assert_close(b @ a, w, atol=1e-9, rtol=1e-9)
    m = FactorizedLinear.from_factors(a.float(), b.float(), torch.ones(48))
    xf = x.float()[:5] / 20
    torch.testing.assert_close(m(xf), xf @ w.float().T + 1, atol=1e-4, rtol=1e-4)


def test_whitened_truncation_is_output_optimal():
    """At rank r the whitened SVD's output error is the tail of W·S's spectrum, and it beats plain SVD
    (which is optimal for the weights, not for these inputs)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 64, generator=g, dtype=torch.float64)
    x = correlated_inputs(400, 64, seed=2)
    err = {}
    for whiten in (False, True):
        s = whitening_factor(x.T @ x, damp=0) if whiten else None
        u, sig, vh = spectrum(w, s)
        a, b = factors(u, sig, vh, 16, s)
        err[whiten] = ((w - b @ a) @ x.T).norm() ** 2
        if whiten:
            torch.testing.assert_close(err[whiten], (sig[16:] ** 2).sum(), rtol=1e-6, atol=0)
    assert err[True] < 0.8 * err[False]


def test_rank_follows_ratio_and_energy():
    s = torch.tensor([10.0, 5, 3, 2, 1, 1, 0.5, 0.5] + [0.1] * 56, dtype=torch.float64)
    for ratio, inn, out, m in [(0.5, 64, 64, 8), (0.3, 576, 1536, 16), (0.25, 1536, 576, 8)]:
        r = choose_rank(s, inn, out, ratio=ratio, multiple_of=m)
        assert r % m == 0 and r * (inn + out) <= ratio * inn * out < (r + m) * (inn + out)
    cum = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
    for energy in (0.8, 0.9, 0.95, 0.99):
        r0 = int((cum < energy).sum()) + 1  # the smallest rank holding `energy`
        assert cum[r0 - 1] >= energy > (cum[r0 - 2] if r0 > 1 else 0)
        assert choose_rank(s, 64, 64, energy=energy, multiple_of=1) == r0
        assert choose_rank(s, 64, 64, energy=energy, multiple_of=8) == -(-r0 // 8) * 8
    assert choose_rank(s, 64, 64, rank=12) == 12 and choose_rank(s, 64, 64, energy=1.0) == 64
    assert saves_params(31, 64, 64) and not saves_params(32, 64, 64)
    lin = nn.Linear(64, 64)
    assert factorize_linear(lin, rank=40, multiple_of=8) == (None, 40)  # saves nothing: stays dense


def low_rank_model(folder, rank: int):
    """The tiny model with every layer linear set to an exact rank-``rank`` product."""
    loaded = load(folder)
    loaded.model.fuse()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, m in loaded.model.named_modules():
            if type(m) is nn.Linear and ".layers." in f".{name}":
                o, i = m.weight.shape
                m.weight.copy_(torch.randn(o, rank, generator=g) @ torch.randn(rank, i, generator=g) * 0.05)
    return loaded


@pytest.mark.parametrize("whiten", [False, True])
def test_exactly_low_rank_model_is_reproduced_and_reloads(hf_folder, tmp_path, whiten):
    folder, _ = hf_folder("llama-gqa-untied")
    lm = low_rank_model(folder, 8)
    with torch.inference_mode():
        before = lm.model(IDS)
    ctx = Context(lm, progress=False)
    ctx.calib_tokens = torch.randint(0, 320, (4, 24), generator=torch.Generator().manual_seed(0))
    rec = run_recipe(ctx, {"steps": [{"lowrank": {"rank": 8, "whiten": whiten}}]})[0]
    assert set(rec["ranks"].values()) == {8} and not rec["kept_dense"] and rec["params"][1] < rec["params"][0]
    assert all(isinstance(lm.model.get_submodule(n), FactorizedLinear) for n in rec["ranks"])
    with torch.inference_mode():
        after = lm.model(IDS)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    save_checkpoint(tmp_path / "c", lm.model, lm.tokenizer, lm.config, ctx.modules, {"name": "lr", "steps": []},
                    source_identity(lm.path))
    back = load(tmp_path / "c")
    assert back.manifest["modules"]["model.layers.0.mlp.down_proj"] == {
        "kind": "lowrank", "in_features": 128, "out_features": 64, "rank": 8, "bias": False}
    with torch.inference_mode():
        torch.testing.assert_close(back.model(IDS), after, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["qwen2-bias", "gpt2"])
def test_ratio_targets_and_a_quantized_chain_reload(hf_folder, tmp_path, arch):
    """Only the targets are factorised, at the rank the ratio gives; biases survive; quantizing the factors
    afterwards (int8) still saves and loads to identical logits."""
    folder, _ = hf_folder(arch)
    lm = load(folder)
    ctx = Context(lm, progress=False)
    ctx.calib_tokens = torch.randint(0, 320, (4, 24), generator=torch.Generator().manual_seed(0))
    target = "o_proj" if arch != "gpt2" else "attn.c_proj"
    recipe = {"name": "lr-int8", "steps": [{"lowrank": {"ratio": 0.4, "targets": [target]}},
                                           {"quantize": {"method": "rtn", "bits": 8, "group_size": None}}]}
    recs = run_recipe(ctx, recipe)
    assert len(recs[0]["ranks"]) == 2 and all(n.endswith(target) for n in recs[0]["ranks"])
    assert set(recs[0]["ranks"].values()) == {choose_rank(torch.ones(1), 64, 64, ratio=0.4)} == {8}
    if arch == "gpt2":
        assert lm.model.transformer.h[0].attn.c_proj.bias is not None
    assert "model.layers.0.self_attn.o_proj.a" in ctx.modules or "transformer.h.0.attn.c_proj.a" in ctx.modules
    with torch.inference_mode():
        got = lm.model(IDS)
    save_checkpoint(tmp_path / "c", lm.model, lm.tokenizer, lm.config, ctx.modules, recipe, source_identity(lm.path))
    with torch.inference_mode():
        torch.testing.assert_close(load(tmp_path / "c").model(IDS), got, atol=0, rtol=0)


def test_parameter_errors_name_the_parameter(hf_folder):
    folder, _ = hf_folder("llama-gqa-untied")
    ctx = Context(load(folder), progress=False)
    ctx.loaded.model.fuse()
    ctx.calib_ids = lambda: pytest.fail("a bad parameter must fail before calibration")
    for params, word in [({}, "ratio"), ({"ratio": 0.5, "energy": 0.9}, "ratio"), ({"ratio": 1.5}, "ratio"),
                         ({"rank": 0}, "rank"), ({"ratio": 0.5, "whiten": "yes"}, "whiten"),
                         ({"ratio": 0.5, "targets": ["q_proj"]}, "targets"), ({"ratio": 0.5, "bits": 4}, "bits"),
                         ({"energy": 1.0, "whiten": False}, "saves")]:
        with pytest.raises(RecipeError, match=word):
            run_lowrank(ctx, params)
