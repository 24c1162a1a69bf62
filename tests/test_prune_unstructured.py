"""Unstructured and N:M pruning: exact counts and patterns, what each score keeps, SparseGPT's error
against the mask-only methods, OWL's allocation, the recipe step and the compress CLI end to end."""

from __future__ import annotations

import json

import pytest
import torch

from miaotui.compress.prune.magnitude import magnitude_mask
from miaotui.compress.prune.masks import n_pruned
from miaotui.compress.prune.nm import is_nm, parse_pattern
from miaotui.compress.prune.owl import outlier_ratio, owl_sparsities
from miaotui.compress.prune.sparsegpt import sparsegpt_prune
from miaotui.compress.prune.unstructured import PruneConfig
from miaotui.compress.prune.wanda import wanda_mask, wanda_score
from miaotui.compress.recipe import Calibration, Context, RecipeError, run_recipe

IDS = torch.tensor([[5, 77, 123, 9, 200, 31, 64, 250, 18, 3, 99, 141]])


def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """(n, d) rows with strongly correlated channels of unequal scale, like a transformer's activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d ** 0.5
    scale = torch.rand(d, generator=g) * 3 + 0.2
    return (torch.randn(n, d, generator=g) @ mix + 0.3 * torch.randn(n, d, generator=g)) * scale


def output_error(x: torch.Tensor, w: torch.Tensor, w2: torch.Tensor) -> float:
    """‖XWᵀ − XW'ᵀ‖² in float64."""
    return float((x.double() @ (w.double() - w2.double()).T).pow(2).sum())


def hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 / x.shape[0] * x.T @ x


# ---- masks: exact counts, the right weights

def test_magnitude_exact_count_and_smallest_dropped():
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(1))
    keep = magnitude_mask(w, 0.3)
    assert int((~keep).sum()) == n_pruned(24 * 40, 0.3) == 288
    assert w.abs()[keep].min() > w.abs()[~keep].max()  # ranked over the whole tensor
    assert (~keep).sum(1).unique().numel() > 1  # so rows differ


def test_wanda_exact_count_per_row_and_lowest_scores_dropped():
    g = torch.Generator().manual_seed(2)
    w, norm = torch.randn(24, 40, generator=g), torch.rand(40, generator=g) * 5
    keep = wanda_mask(w, norm, 0.3)
    assert ((~keep).sum(1) == 12).all()  # round(0.3 * 40) in every row
    score = wanda_score(w, norm)
    for r in range(24):
        assert score[r][keep[r]].min() > score[r][~keep[r]].max()


def test_sparsegpt_exact_count_per_block_and_row_group():
    g = torch.Generator().manual_seed(3)
    x, w = correlated_inputs(512, 48), torch.randn(20, 48, generator=g)
    groups = [slice(0, 8), slice(8, 20)]
    out = sparsegpt_prune(w, hessian(x), 0.3, row_groups=groups, block_size=16)
    for rows in groups:
        for c in range(0, 48, 16):
            block = out[rows, c:c + 16]
            assert int((block == 0).sum()) == n_pruned(block.numel(), 0.3)


def test_sparsegpt_row_groups_prune_like_separate_linears():
    """A fused linear's parts (rows) ranked on their own give the unfused result: fusing changes nothing."""
    g = torch.Generator().manual_seed(4)
    x, w1, w2 = correlated_inputs(400, 32), torch.randn(6, 32, generator=g), 5 * torch.randn(10, 32, generator=g)
    h = hessian(x)
    fused = sparsegpt_prune(torch.cat([w1, w2]), h, 0.5, row_groups=[slice(0, 6), slice(6, 16)], block_size=16)
    apart = torch.cat([sparsegpt_prune(w1, h, 0.5, block_size=16), sparsegpt_prune(w2, h, 0.5, block_size=16)])
    torch.testing.assert_close(fused, apart)
    one_group = sparsegpt_prune(torch.cat([w1, w2]), h, 0.5, block_size=16)
    assert int((one_group[:6] == 0).sum()) != int((fused[:6] == 0).sum())  # w2's larger scale would win


def test_sparsegpt_at_zero_sparsity_leaves_the_weight():
    g = torch.Generator().manual_seed(5)
    x, w = correlated_inputs(300, 32), torch.randn(8, 32, generator=g)
    torch.testing.assert_close(sparsegpt_prune(w, hessian(x), 0.0, block_size=8), w)


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "3:8"])
def test_nm_exact_pattern_for_every_method(pattern):
    n, m = parse_pattern(pattern)
    g = torch.Generator().manual_seed(6)
    x, w = correlated_inputs(256, 64), torch.randn(16, 64, generator=g)
    masked = {"magnitude": w * magnitude_mask(w, 0, (n, m)),
              "wanda": w * wanda_mask(w, x.norm(dim=0), 0, (n, m)),
              "sparsegpt": sparsegpt_prune(w, hessian(x), 0, (n, m), block_size=16)}
    for method, pw in masked.items():
        assert is_nm(pw, n, m), method
        assert ((pw != 0).reshape(16, -1, m).sum(2) == n).all(), method  # exactly N kept in every group
        assert int((pw == 0).sum()) == 16 * 64 * (m - n) // m
    # magnitude keeps the N largest of each group: the reference by sorting
    ref = torch.zeros_like(w)
    grp = w.reshape(16, -1, m)
    top = grp.abs().topk(n, dim=2).indices
    ref.view(16, -1, m).scatter_(2, top, grp.gather(2, top))
    torch.testing.assert_close(masked["magnitude"], ref)
    assert not is_nm(w, n, m)


def test_parse_pattern_errors():
    from miaotui.errors import MiaotuiError

    assert parse_pattern(" 2 : 4 ") == (2, 4)
    for bad in ["4:4", "0:4", "2-4", "5:4", 124]:
        with pytest.raises(MiaotuiError):
            parse_pattern(bad)


# ---- what the scores keep

def test_wanda_keeps_the_high_norm_input_channel_magnitude_drops():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(32, 64, generator=g)
    w[:, 5] *= 0.2  # small weights ...
    x = torch.randn(1000, 64, generator=g)
    x[:, 5] *= 50.0  # ... on an outlier channel: they carry most of the output
    assert magnitude_mask(w, 0.5)[:, 5].float().mean() < 0.2
    assert wanda_mask(w, x.norm(dim=0), 0.5)[:, 5].all()
    err_mag = output_error(x, w, w * magnitude_mask(w, 0.5))
    err_wanda = output_error(x, w, w * wanda_mask(w, x.norm(dim=0), 0.5))
    assert err_wanda < 0.2 * err_mag


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_lowers_output_error_vs_magnitude_and_wanda(nm):
    g = torch.Generator().manual_seed(8)
    x = correlated_inputs(2048, 96, seed=9)
    w = torch.randn(64, 96, generator=g)
    h = hessian(x)
    err = {"magnitude": output_error(x, w, w * magnitude_mask(w, 0.5, nm)),
           "wanda": output_error(x, w, w * wanda_mask(w, x.norm(dim=0), 0.5, nm)),
           "sparsegpt": output_error(x, w, sparsegpt_prune(w, h, 0.5, nm, block_size=32, percdamp=0.01))}
    assert err["sparsegpt"] < 0.8 * min(err["magnitude"], err["wanda"]), err
    # the same mask without the weight update is worse: the update is what helps
    pruned = sparsegpt_prune(w, h, 0.5, nm, block_size=32)
    assert output_error(x, w, w * (pruned != 0)) > err["sparsegpt"]


# ---- OWL

def test_owl_sparsities_mean_bound_and_order():
    g = torch.Generator().manual_seed(10)
    for ratios in [torch.rand(30, generator=g).tolist(), [0.0, 0.0, 0.0, 1.0], [0.01, 0.02, 0.2, 0.05]]:
        s = owl_sparsities(ratios, 0.5, 0.08)
        assert abs(sum(s) / len(s) - 0.5) < 1e-12
        assert all(0.42 - 1e-12 <= v <= 0.58 + 1e-12 for v in s)
        assert max(s) - min(s) <= 0.16 + 1e-12
        order = sorted(range(len(s)), key=lambda i: ratios[i])
        assert all(s[a] >= s[b] for a, b in zip(order, order[1:]))  # more outliers, less pruning
        assert max(abs(v - 0.5) for v in s) > 0.079  # the bound is used, not just respected
    # symmetric ratios: exactly the paper's formula (range 2λ)
    s = owl_sparsities([0.1, 0.2, 0.3], 0.5, 0.08)
    assert s == pytest.approx([0.58, 0.5, 0.42])
    assert owl_sparsities([0.3, 0.3], 0.6, 0.1) == [0.6, 0.6]


def test_outlier_ratio():
    scores = torch.ones(100)
    scores[:7] = 20.0  # mean = 2.33: the seven are above 5x it, nothing else is
    assert outlier_ratio([scores[:50], scores[50:]], 5.0) == pytest.approx(0.07)
    assert outlier_ratio([scores], 10.0) == 0.0


# ---- the recipe step on tiny models

@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("The capital of France is Paris. Once upon a time, hello world, hello there! " * 60)
    return path


def pruned_model(folder, calib_text, **params):
    from miaotui.loading import load

    loaded = load(folder)
    ctx = Context(loaded, Calibration(str(calib_text), samples=4, seq_len=32), progress=False)
    records = run_recipe(ctx, {"name": "p", "steps": [{"prune": params}]})
    return loaded, records[0]


def decoder_weights(model) -> dict[str, torch.Tensor]:
    from miaotui.compress.layerwise import layer_stack

    stack = layer_stack(model)
    return {f"{i}.{n}": lin.weight.detach() for i, layer in enumerate(stack.layers)
            for n, lin in stack.linears(layer).items()}


@pytest.mark.parametrize("arch", ["llama-gqa-untied", "gpt2"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_recipe_step_prunes_every_decoder_linear(hf_folder, calib_text, arch, method):
    from miaotui.loading import load

    folder, _ = hf_folder(arch)
    loaded, rec = pruned_model(folder, calib_text, method=method, sparsity=0.5)
    assert rec["step"] == "prune" and rec["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert rec["layer_sparsity"] == pytest.approx([0.5, 0.5], abs=2e-3)
    names = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj"} if arch != "gpt2" else {"attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                      "mlp.c_proj"}
    assert set(rec["linear_sparsity"]) == names
    for name, w in decoder_weights(loaded.model).items():
        zeros = (w == 0).float()
        assert zeros.mean() == pytest.approx(0.5, abs=2e-3), name
        if method == "wanda":
            assert (zeros.sum(1) == w.shape[1] // 2).all(), name
    dense = load(folder)
    assert all(w.eq(0).float().mean() < 0.01 for w in decoder_weights(dense.model).values())
    head = loaded.model.lm_head.weight
    assert head.eq(0).float().mean() < 0.01  # the head is never pruned
    with torch.inference_mode():
        a, b = loaded.model(IDS), dense.model(IDS)
    assert torch.isfinite(a).all() and not torch.allclose(a, b, atol=1e-3)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_recipe_step_nm_pattern(hf_folder, calib_text, method):
    folder, _ = hf_folder("llama-gqa-untied")
    loaded, rec = pruned_model(folder, calib_text, method=method, pattern="4:8")
    assert rec["sparsity"] == 0.5 and rec["target_sparsity"] == 0.5
    for name, w in decoder_weights(loaded.model).items():
        assert is_nm(w, 4, 8) and int((w == 0).sum()) == w.numel() // 2, name


def test_recipe_step_owl_and_linears(hf_folder, calib_text):
    folder, _ = hf_folder("llama-mha-tied")
    loaded, rec = pruned_model(folder, calib_text, method="wanda", sparsity=0.6, allocation="owl",
                               owl_lambda=0.1, owl_m=3)
    owl = rec["owl"]
    assert sum(owl["layer_target"]) / 2 == pytest.approx(0.6, abs=1e-4)
    assert all(0.5 - 1e-4 <= s <= 0.7 + 1e-4 for s in owl["layer_target"])
    # each layer hits its own target up to rounding to whole weights per row (rows of 64 or 128 inputs)
    assert rec["layer_sparsity"] == pytest.approx(owl["layer_target"], abs=0.5 / 64 + 1e-4)
    assert rec["sparsity"] == pytest.approx(0.6, abs=0.5 / 64)
    loaded, rec = pruned_model(folder, calib_text, method="magnitude", sparsity=0.5, linears=["mlp.*", "o_proj"])
    assert set(rec["linear_sparsity"]) == {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "self_attn.o_proj"}
    w = decoder_weights(loaded.model)
    assert w["0.self_attn.qkv_proj"].eq(0).float().mean() < 0.01
    assert w["0.mlp.down_proj"].eq(0).float().mean() == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("params, match", [
    ({"method": "obd"}, "method"),
    ({"sparsity": 1.0}, "sparsity"),
    ({"sparsity": "half"}, "sparsity"),
    ({"pattern": 124}, "124"),  # YAML's reading of an unquoted 2:4
    ({"pattern": "4:2"}, "pattern"),
    ({"pattern": "2:4", "sparsity": 0.7}, "contradicts"),
    ({"allocation": "greedy"}, "allocation"),
    ({"allocation": "owl", "pattern": "2:4"}, "owl"),
    ({"allocation": "owl", "sparsity": 0.95, "owl_lambda": 0.1}, "owl_lambda"),
    ({"allocation": "owl", "owl_m": 0}, "owl_m"),
    ({"owl_lambda": 0.1}, "owl_lambda"),
    ({"method": "wanda", "block_size": 64}, "block_size"),
    ({"method": "sparsegpt", "block_size": 0}, "block_size"),
    ({"method": "sparsegpt", "pattern": "2:8", "block_size": 12}, "block_size"),
    ({"method": "sparsegpt", "percdamp": -1}, "percdamp"),
    ({"linears": []}, "linears"),
    ({"sparsty": 0.5}, "sparsty"),
])
def test_parameter_errors_name_the_parameter(params, match):
    with pytest.raises(RecipeError, match=match):
        PruneConfig.from_params(params)


def test_config_defaults():
    assert PruneConfig().target == 0.5 and PruneConfig(pattern="1:4").target == 0.75
    assert PruneConfig(method="sparsegpt").block == 128
    assert PruneConfig(method="sparsegpt", pattern="2:6").block == 132  # the default rounded up to M's multiple
    assert not PruneConfig(method="magnitude").needs_calibration
    assert PruneConfig(method="magnitude", allocation="owl").needs_calibration


def test_model_errors(hf_folder, calib_text, tmp_path):
    from miaotui.loading import load
    from miaotui.models.bert import BertEncoder

    folder, _ = hf_folder("llama-gqa-untied")
    with pytest.raises(RecipeError, match="frobnicate"):
        pruned_model(folder, calib_text, method="magnitude", linears=["frobnicate"])
    with pytest.raises(RecipeError, match="divisible by 3"):  # hidden 64 is no multiple of M=3
        pruned_model(folder, calib_text, method="magnitude", pattern="1:3")
    loaded = load(folder)
    ctx = Context(loaded, progress=False)
    steps = [{"quantize": {"method": "rtn", "bits": 8}}, {"prune": {"method": "magnitude"}}]
    with pytest.raises(RecipeError, match="before quantizing"):
        run_recipe(ctx, {"name": "q", "steps": steps})

    class Encoder:  # an encoder (BERT) is not a decoder the step knows
        model = BertEncoder.from_config(dict(vocab_size=50, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=4,
                                             max_position_embeddings=16, type_vocab_size=2, model_type="bert"))
        model.fuse = lambda: None
    with pytest.raises(RecipeError, match="BertEncoder"):
        run_recipe(Context(Encoder(), progress=False), {"name": "e", "steps": [{"prune": {"method": "magnitude"}}]})


def test_compress_cli_yaml_prune_then_quantize(hf_folder, calib_text, tmp_path, capsys):
    """prune (Wanda) → int8 in one YAML recipe through the CLI; the checkpoint reloads with its zeros."""
    from miaotui.cli.main import main
    from miaotui.compress.quant.qlinear import QuantLinear
    from miaotui.loading import load

    folder, _ = hf_folder("llama-gqa-untied")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: sparse-int8\nsteps:\n  - prune: {method: wanda, sparsity: 0.5}\n"
                      "  - quantize: {method: rtn, bits: 8, group_size: null, symmetric: true}\n")
    out = tmp_path / "ck"
    assert main(["compress", "--model", str(folder), "--recipe", str(recipe), "--output", str(out),
                 "--calib", str(calib_text), "--calib-samples", "4", "--calib-len", "32", "--json"]) == 0
    capsys.readouterr()
    manifest = json.loads((out / "manifest.json").read_text())
    prune_rec = manifest["recipe"]["records"][0]
    assert prune_rec["step"] == "prune" and prune_rec["sparsity"] == pytest.approx(0.5, abs=1e-3)
    back = load(out)
    quant = {n: m for n, m in back.model.named_modules() if isinstance(m, QuantLinear) and n != "lm_head"}
    assert len(quant) == 8  # 4 fused linears x 2 layers
    for name, m in quant.items():  # symmetric int8 keeps a zero exactly zero
        w = m.dequantize()
        assert (w == 0).sum(1).float().min() >= w.shape[1] // 2, name
    assert main(["generate", "--model", str(out), "--temperature", "0", "--max-tokens", "5", "--ignore-eos",
                 "--json", "Hello"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["completion_tokens"] == 5

