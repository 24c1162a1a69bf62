"""Structured pruning (heads, MLP channels, layers): the physically smaller model equals the dense model with
the same heads / channels / layers masked out; its checkpoint rebuilds from config.json alone; the scores
pick what contributes nothing; the engine generates with it."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tokenizer

from miaotui.compress.prune.structured import (
    decoder_layers, head_shape, out_proj, prune_channels, run_prune_channels, run_prune_heads, run_prune_layers,
    select_heads,
)
from miaotui.compress.recipe import Context, RecipeError, run_recipe
from miaotui.loading import load
from miaotui.loading.checkpoint import save_checkpoint, source_identity

VOCAB = 320
# group of 3 query heads per KV head (like SmolLM2's 9/3), 4 layers so dropping leaves a stack
MODELS = {
    "llama-g3": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=96, intermediate_size=160, num_hidden_layers=4, num_attention_heads=6,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=False)),
    "qwen2-bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=VOCAB, n_embd=64, n_layer=4, n_head=4,
                                                    n_positions=128)),
}
IDS = torch.tensor([[5, 77, 123, 9, 200, 31, 64, 250, 18, 3, 99, 141, 7, 42]])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    import transformers

    cache = {}

    def get(name: str):
        if name not in cache:
            cfg_cls, model_cls, kwargs = MODELS[name]
            torch.manual_seed(0)
            model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kwargs)).eval()
            with torch.no_grad():  # perturb so biases and norms matter too
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.05)
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            make_tokenizer().save_pretrained(path)
            cache[name] = path
        return cache[name]

    return get


def context(path) -> Context:
    loaded = load(path)
    ctx = Context(loaded, progress=False)
    ctx.calib_tokens = torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(1))  # calibration
    loaded.model.fuse()
    return ctx


def dense(path):
    loaded = load(path)
    loaded.model.fuse()
    return loaded


def attn_of(layer):
    return layer.self_attn if hasattr(layer, "self_attn") else layer.attn


def logits(model, ids=IDS):
    with torch.inference_mode():
        return model(ids)


def save_and_load(ctx: Context, out):
    lm = ctx.loaded
    save_checkpoint(out, lm.model, lm.tokenizer, lm.config, ctx.modules, {"name": "t", "steps": []},
                    source_identity(lm.path))
    return load(out)


@pytest.mark.parametrize("name,params", [
    ("llama-g3", {"heads_per_group": 1}), ("llama-g3", {"kv_groups": 1}),
    ("llama-g3", {"heads_per_group": 2, "kv_groups": 1}), ("llama-g3", {"fraction": 0.34}),
    ("qwen2-bias", {"heads_per_group": 1}), ("gpt2", {"kv_groups": 2}), ("gpt2", {"fraction": 0.25}),
])
def test_head_pruning_equals_masking_and_reloads(folder, tmp_path, name, params):
    path = folder(name)
    ctx = context(path)
    shape = head_shape(attn_of(decoder_layers(ctx.loaded.model)[0]))
    rec = run_prune_heads(ctx, params)
    ref = dense(path)
    for layer, kept in zip(decoder_layers(ref.model), rec["kept"]):
        o, d = out_proj(attn_of(layer)), shape.head_dim
        groups = [q // shape.group for q in kept["q"]]
        assert sorted(set(groups)) == kept["kv"] and len(set(groups.count(g) for g in kept["kv"])) == 1
        for h in set(range(shape.n_q)) - set(kept["q"]):
            o.weight.data[:, h * d:(h + 1) * d] = 0  # the head's output never reaches the residual stream
    n_q, n_kv = rec["query_heads"][1], rec["kv_heads"][1]
    assert n_q < shape.n_q and n_q % n_kv == 0
    pruned = logits(ctx.loaded.model)
    torch.testing.assert_close(pruned, logits(ref.model), atol=1e-5, rtol=1e-5)
    back = save_and_load(ctx, tmp_path / "ckpt")  # rebuilt from config.json: no special case
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["head_dim"] == shape.head_dim
    assert cfg.get("num_attention_heads", cfg.get("n_head")) == n_q
    assert head_shape(attn_of(decoder_layers(back.model)[0])).n_kv == n_kv
    assert back.model.kv_shape() == (n_kv, shape.head_dim)
    torch.testing.assert_close(logits(back.model), pruned, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["llama-g3", "qwen2-bias", "gpt2"])
def test_channel_pruning_equals_masking_and_reloads(folder, tmp_path, name):
    path = folder(name)
    ctx = context(path)
    ref = dense(path)
    kept = prune_channels(ctx.loaded.model, ctx.calib_ids(), keep=96, progress=False)
    for layer, keep in zip(decoder_layers(ref.model), kept):
        down = layer.mlp.down_proj if hasattr(layer.mlp, "down_proj") else layer.mlp.c_proj
        mask = torch.ones(down.in_features, dtype=torch.bool)
        mask[keep] = False
        down.weight.data[:, mask] = 0
    torch.testing.assert_close(logits(ctx.loaded.model), logits(ref.model), atol=1e-5, rtol=1e-5)
    # the recipe step: uniform count, config updated, checkpoint rebuilds
    ctx = context(path)
    rec = run_prune_channels(ctx, {"fraction": 0.25, "multiple_of": 32})
    inter = rec["intermediate_size"]
    assert inter[1] == round(inter[0] * 0.75 / 32) * 32 and rec["params_removed"] > 0
    back = save_and_load(ctx, tmp_path / "ckpt")
    cfg = back.config
    assert cfg.get("intermediate_size", cfg.get("n_inner")) == inter[1]
    torch.testing.assert_close(logits(back.model), logits(ctx.loaded.model), atol=0, rtol=0)


@pytest.mark.parametrize("name", ["llama-g3", "gpt2"])
def test_layer_pruning_equals_skipping_and_reloads(folder, tmp_path, name):
    path = folder(name)
    ctx = context(path)
    rec = run_prune_layers(ctx, {"count": 2})
    assert len(rec["distances"]) == 4 and len(rec["dropped"]) == 2
    ref = dense(path)
    for i in rec["dropped"]:  # skip: the layer hands its input on unchanged
        decoder_layers(ref.model)[i].register_forward_hook(lambda m, args, out: args[0])
    torch.testing.assert_close(logits(ctx.loaded.model), logits(ref.model), atol=1e-5, rtol=1e-5)
    back = save_and_load(ctx, tmp_path / "ckpt")
    assert len(decoder_layers(back.model)) == 2
    torch.testing.assert_close(logits(back.model), logits(ctx.loaded.model), atol=0, rtol=0)
    ctx = context(path)  # angular: one contiguous block
    rec = run_prune_layers(ctx, {"fraction": 0.5, "method": "angular"})
    assert len(rec["distances"]) == 3 and rec["dropped"] == list(range(rec["dropped"][0], rec["dropped"][0] + 2))


def test_scores_pick_what_contributes_nothing(folder):
    """A head whose o_proj slice is zero, channels whose down_proj columns are zero and a layer that is an
    identity are what pruning removes first, and removing them leaves the logits as they were."""
    path = folder("llama-g3")
    ctx = context(path)
    model = ctx.loaded.model
    layers = decoder_layers(model)
    with torch.no_grad():
        for layer in layers:
            layer.self_attn.o_proj.weight[:, 1 * 16:2 * 16] = 0  # query head 1 (KV group 0)
            layer.self_attn.o_proj.weight[:, 4 * 16:5 * 16] = 0  # query head 4 (KV group 1)
            layer.mlp.down_proj.weight[:, 10:74] = 0  # 64 channels
        layers[2].self_attn.o_proj.weight.zero_()  # layer 2 adds nothing to the residual stream
        layers[2].mlp.down_proj.weight.zero_()
    before = logits(model)
    rec = run_prune_heads(ctx, {"heads_per_group": 1})
    # (layer 2's heads all score 0, a tie)
    assert all(k["q"] == [0, 2, 3, 5] for i, k in enumerate(rec["kept"]) if i != 2)
    kept = prune_channels(model, ctx.calib_ids(), keep=160 - 64, progress=False)
    assert all(not ((k >= 10) & (k < 74)).any() for i, k in enumerate(kept) if i != 2)
    rec = run_prune_layers(ctx, {"count": 1})
    assert rec["dropped"] == [2] and rec["distances"][2] == min(rec["distances"])
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=1e-5)


def test_select_heads_is_gqa_consistent():
    hs = torch.tensor([3., 1, 2, 9, 8, 7, 4, 6, 5])
    assert select_heads(hs, torch.tensor([1., 3, 2]), 3, 1, 0) == ([0, 2, 3, 4, 7, 8], [0, 1, 2])
    assert select_heads(hs, torch.tensor([1., 3, 2]), 3, 0, 1) == ([3, 4, 5, 6, 7, 8], [1, 2])
    assert select_heads(hs, torch.tensor([1., 3, 2]), 3, 2, 2) == ([3], [1])
    with pytest.raises(ValueError):
        select_heads(hs, torch.tensor([1., 3, 2]), 3, 3, 0)


def test_engine_greedy_on_pruned_equals_masked_dense(folder):
    """The engine (static cache one at a time, paged cache as a batch) runs the smaller model; its greedy
    text equals the dense model's with the same heads and channels zeroed."""
    from miaotui import LLM, SamplingParams

    path = folder("llama-g3")
    ctx = context(path)
    rec = run_prune_heads(ctx, {"heads_per_group": 1, "kv_groups": 1})
    kept_ch = prune_channels(ctx.loaded.model, ctx.calib_ids(), keep=128, progress=False)
    ref = dense(path)
    for layer, kept, ch in zip(decoder_layers(ref.model), rec["kept"], kept_ch):
        for h in set(range(6)) - set(kept["q"]):
            layer.self_attn.o_proj.weight.data[:, h * 16:(h + 1) * 16] = 0
        mask = torch.ones(160, dtype=torch.bool)
        mask[ch] = False
        layer.mlp.down_proj.weight.data[:, mask] = 0
    assert ctx.loaded.model.kv_shape() == (1, 16)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = ["The capital of France is", "Once upon a time"]
    small, big = LLM(ctx.loaded), LLM(ref)
    assert [small.generate(p, params).text for p in prompts] == [big.generate(p, params).text for p in prompts]
    assert [c.text for c in small.generate(prompts, params)] == [c.text for c in big.generate(prompts, params)]


def test_config_errors_name_the_parameter(folder):
    ctx = context(folder("llama-g3"))
    for step, params, word in [
        (run_prune_heads, {"heads_per_group": 3}, "heads_per_group"),
        (run_prune_heads, {"kv_groups": 2}, "kv_groups"),
        (run_prune_heads, {"fraction": 0.3, "kv_groups": 1}, "fraction"),
        (run_prune_heads, {"head": 1}, "head"),
        (run_prune_channels, {"keep": 500}, "keep"),
        (run_prune_channels, {"fraction": 1.5}, "fraction"),
        (run_prune_channels, {}, "keep"),
        (run_prune_layers, {"count": 4}, "4"),
        (run_prune_layers, {"count": 1, "method": "random"}, "method"),
        (run_prune_layers, {"layers": [9]}, "layers"),
    ]:
        with pytest.raises(RecipeError, match=word):
            step(ctx, params)


def test_encoder_heads_channels_layers(tmp_path):
    """The same steps on a BERT encoder (through encoder/prune.py): heads and channels equal masking them,
    layers shrink the stack; scored on the lines of a calibration file."""
    import numpy as np
    from test_bert import TEXTS, make_model
    from test_bert import make_tokenizer as bert_tokenizer

    from miaotui.compress.recipe import Calibration
    from miaotui.encoder import Encoder
    from miaotui.loading.encoder import load_encoder

    path = tmp_path / "bert"
    make_model("bert").save_pretrained(path)
    bert_tokenizer().save_pretrained(path)
    (tmp_path / "calib.txt").write_text("\n".join(TEXTS * 3))
    loaded = load_encoder(path)
    ctx = Context(loaded, Calibration(file=str(tmp_path / "calib.txt")), progress=False)
    rec = run_prune_heads(ctx, {"heads": 1})
    ref = Encoder(path)
    for layer, drop in zip(ref.model.layers, rec["dropped"]):
        qkv = layer.attention.qkv  # hidden 32, 4 heads of 8: the value block starts at 64
        for h in drop:
            qkv.weight.data[64 + h * 8:64 + (h + 1) * 8] = 0
            qkv.bias.data[64 + h * 8:64 + (h + 1) * 8] = 0
    assert rec["heads"] == [4, 3] and all(len(d) == 1 for d in rec["dropped"])
    np.testing.assert_allclose(Encoder(loaded).encode(TEXTS), ref.encode(TEXTS), atol=1e-5)
    rec = run_prune_channels(ctx, {"keep": 48})
    assert rec["intermediate_size"] == [64, 48] and ctx.loaded.config["intermediate_size"] == 48
    assert all(layer.intermediate.out_features == 48 for layer in loaded.model.layers)
    rec = run_prune_layers(ctx, {"count": 1})
    assert len(loaded.model.layers) == 1 and ctx.loaded.config["num_hidden_layers"] == 1
    assert len(rec["distances"]) == 2 and Encoder(loaded).encode(TEXTS).shape == (len(TEXTS), 32)


def test_cli_compress_with_a_structured_recipe(folder, tmp_path):
    """``miaotui compress --recipe YAML`` chains the steps; the checkpoint loads and generates."""
    from miaotui.cli.main import main

    path = folder("llama-g3")
    (tmp_path / "r.yaml").write_text("name: shrink\nsteps:\n"
                                     "  - prune-layers: {count: 1}\n"
                                     "  - prune-channels: {fraction: 0.2, multiple_of: 16}\n"
                                     "  - prune-heads: {heads_per_group: 1}\n")
    (tmp_path / "calib.txt").write_text("The capital of France is Paris. Hello world, hello there! " * 20)
    out = tmp_path / "out"
    assert main(["compress", "-m", str(path), "--recipe", str(tmp_path / "r.yaml"), "-o", str(out),
                 "--calib", str(tmp_path / "calib.txt"), "--calib-samples", "4", "--calib-len", "32"]) == 0
    back = load(out)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["head_dim"]) == (3, 128, 4, 2, 16)
    assert [r["step"] for r in back.manifest["recipe"]["records"]] == ["prune-layers", "prune-channels", "prune-heads"]
    assert main(["generate", "-m", str(out), "Hello", "-t", "0", "-n", "4"]) == 0


def test_refit_is_the_least_squares_fit_and_helps():
    """``refit_columns`` gives the kept columns that best reproduce the full layer on the calibration
    inputs (checked against lstsq), and a refit model is closer to the dense one than plain cutting."""
    from miaotui.compress.prune.structured import refit_columns

    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 40, generator=g, dtype=torch.float64) @ torch.randn(40, 40, generator=g, dtype=torch.float64)
    lin = torch.nn.Linear(40, 24, bias=False).double()
    w = lin.weight.detach().clone()
    keep = torch.arange(0, 40, 2)
    refit_columns(lin, x.T @ x, keep, damp=0)
    expected = torch.linalg.lstsq(x[:, keep], x @ w.T).solution.T
    torch.testing.assert_close(lin.weight[:, keep], expected, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("name", ["llama-g3", "gpt2"])
def test_refit_brings_the_pruned_model_closer(folder, name):
    path = folder(name)
    ctx = context(path)
    full = logits(ctx.loaded.model, ctx.calib_ids())
    err = {}
    for refit in (False, True):
        ctx = context(path)
        run_recipe(ctx, {"steps": [{"prune-channels": {"keep": 64, "refit": refit}},
                                   {"prune-heads": {"fraction": 0.34 if name != "gpt2" else 0.25, "refit": refit}}]})
        err[refit] = (logits(ctx.loaded.model, ctx.calib_ids()) - full).pow(2).mean()
    assert err[True] < 0.7 * err[False]
