"""Compressing BERT-family encoders through the compress recipes and checkpoint format: tiny random models
built in test_bert.py's way, plus the real all-MiniLM-L6-v2 (slow)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from test_bert import TEXTS, folder, make_model, make_tokenizer, sentence_transformers_folder  # noqa: F401

from miaotui.cli.main import main
from miaotui.compress.recipe import Calibration, Context, RecipeError, load_recipe, run_recipe
from miaotui.encoder import Encoder
from miaotui.errors import ModelLoadError
from miaotui.loading import load
from miaotui.loading.checkpoint import save_checkpoint, source_identity
from miaotui.loading.encoder import LoadedEncoder, copy_pooling_files, load_encoder

MORE_TEXTS = TEXTS + ["the capital of france is paris .", "a cat is on the dog", "dog sat", "mat of paris"]


@pytest.fixture
def st_folder(folder, tmp_path):
    """A tiny BERT in sentence-transformers layout: mean pooling, normalised."""
    path, _ = sentence_transformers_folder(folder, tmp_path, {"pooling_mode_mean_tokens": True}, normalize=True)
    return path


def compress(path, recipe, out, calib=None) -> tuple[LoadedEncoder, np.ndarray]:
    """Run ``recipe`` on the encoder at ``path`` through the library, save it to ``out``; returns the compressed
    model in memory and its embeddings before saving."""
    loaded = load_encoder(path)
    ctx = Context(loaded, Calibration(file=calib), progress=False)
    records = run_recipe(ctx, recipe if isinstance(recipe, dict) else load_recipe(recipe))
    before = Encoder(loaded).encode(MORE_TEXTS)
    save_checkpoint(out, loaded.model, loaded.tokenizer, loaded.config, ctx.modules, {"records": records},
                    source_identity(loaded.path))
    copy_pooling_files(loaded.path, out)
    return loaded, before


def kernels_available() -> bool:
    from miaotui import kernels

    return kernels.available()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


@pytest.mark.parametrize("recipe,kind", [("int8", "int8"), ("w8a8-smoothquant", "w8a8"), ("int4-rtn", "int4")])
def test_checkpoint_round_trip(st_folder, tmp_path, recipe, kind, native_preferred):
    # native_preferred: every Encoder built here swaps its linears for native few-row kernels (as on AVX2 machines)
    fp32 = Encoder(st_folder).encode(MORE_TEXTS)
    out = tmp_path / "ckpt"
    _, before = compress(st_folder, recipe, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert {s["kind"] for s in manifest["modules"].values()} == {kind}
    assert len(manifest["modules"]) == 2 * 4  # 2 layers x (qkv, out, intermediate, output)
    after = Encoder(out).encode(MORE_TEXTS)
    np.testing.assert_allclose(after, before, atol=1e-6)  # the saved model computes what was compressed
    loaded = load(out)  # load() hands encoder checkpoints to the encoder loader
    assert isinstance(loaded, LoadedEncoder) and loaded.format == "miaotui"
    assert loaded.pooling == load_encoder(st_folder).pooling and (out / "1_Pooling" / "config.json").is_file()
    floor = 0.95 if kind == "int4" else 0.99
    assert cosines(after, fp32).min() >= floor
    assert cosines(after, fp32).min() < 1 - 1e-7  # it really was quantized


def test_round_trip_keeps_mlm_logits(folder, tmp_path):
    path, _ = folder("bert-mlm")
    loaded, _ = compress(path, "int8", tmp_path / "ckpt")
    enc, reloaded = Encoder(loaded), Encoder(tmp_path / "ckpt")
    ids, types = enc.tokenize(TEXTS)
    with torch.no_grad():
        a = enc.model.mlm(enc.model(enc.model.pack(ids, types)))
        b = reloaded.model.mlm(reloaded.model(reloaded.model.pack(ids, types)))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert reloaded.fill_mask("the cat [MASK] on the mat")[0][0]["token"] == enc.fill_mask("the cat [MASK] on the mat")[0][0]["token"]


def test_smoothing_keeps_the_float_function(st_folder, native_preferred):
    from miaotui.encoder.quantize import smooth_attention_out
    from miaotui.kernels.linear import GemvMixin

    enc = Encoder(st_folder)
    if kernels_available():
        assert isinstance(enc.model.layers[0].attention.qkv, GemvMixin)  # the prepared encoder's linears
    before = enc.encode(MORE_TEXTS)
    v_rows = enc.model.layers[0].attention.qkv.weight[64:].clone()
    assert smooth_attention_out(enc, MORE_TEXTS, alpha=0.5) == 2
    assert not torch.equal(enc.model.layers[0].attention.qkv.weight[64:], v_rows)  # it did rescale
    np.testing.assert_allclose(enc.encode(MORE_TEXTS), before, atol=1e-5)


def test_w8a8_kernels_equal_integer_math():
    from miaotui.compress.quant import kernels
    from miaotui.compress.quant.qlinear import W8A8Linear
    from miaotui.encoder.quantize import symmetric_int8

    if not kernels.fbgemm_linear_supported():
        pytest.skip("no FBGEMM in this PyTorch build")
    torch.manual_seed(0)
    w, b = torch.randn(48, 64), torch.randn(48)
    m = W8A8Linear.from_quantized(symmetric_int8(w, 63), b)
    assert m._pack_fbgemm()
    x = torch.randn(100, 64) * 2
    x[:, 5] *= 30  # an outlier channel: per-token scales differ a lot
    sx = x.double().abs().amax(-1, keepdim=True) / 127
    ref = (torch.round(x.double() / sx).clamp(-127, 127) @ m.qweight.double().t()) * sx * m.scale.double() + b.double()
    torch.testing.assert_close(m._fbgemm_forward(x).double(), ref, atol=1e-3, rtol=1e-5)
    full = W8A8Linear.from_quantized(symmetric_int8(w, 127), b)
    assert not full._pack_fbgemm()  # 8-bit codes would saturate FBGEMM's int16 pair sums: refused


def test_pruned_and_quantized_checkpoint_loads(st_folder, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - prune-heads: {heads: 1}\n  - prune-layers: {count: 1}\n"
                      "  - quantize: {method: smoothquant}\n")
    out = tmp_path / "ckpt"
    loaded, before = compress(st_folder, str(recipe), out)
    assert len(loaded.model.layers) == 1 and loaded.model.layers[0].attention.out.in_features == 24
    after = Encoder(out).encode(MORE_TEXTS)
    np.testing.assert_allclose(after, before, atol=1e-6)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1


def test_corrupt_or_edited_checkpoint_fails_clearly(st_folder, tmp_path):
    out = tmp_path / "ckpt"
    compress(st_folder, "int8", out)
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="sha256"):
        Encoder(bad)
    shutil.rmtree(bad)
    shutil.copytree(out, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(ModelLoadError, match="missing"):
        load_encoder(bad)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["modules"]["layers.7.output"] = manifest["modules"]["layers.0.output"]
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match="layers.7.output"):
        load(bad)


def test_encoder_recipe_errors_name_the_parameter(st_folder, tmp_path):
    loaded = load_encoder(st_folder)
    ctx = Context(loaded, progress=False)
    with pytest.raises(RecipeError, match="gptq"):
        run_recipe(ctx, load_recipe("int4-gptq"))
    with pytest.raises(RecipeError, match="alpha"):
        run_recipe(ctx, {"steps": [{"quantize": {"method": "smoothquant", "alpha": 3}}]})
    with pytest.raises(RecipeError, match="weight_bits"):
        run_recipe(ctx, {"steps": [{"quantize": {"method": "smoothquant", "weight_bits": 4}}]})
    with pytest.raises(RecipeError, match="group_size"):
        run_recipe(ctx, {"steps": [{"quantize": {"method": "rtn", "bits": 8, "group_size": 16}}]})


def test_cli_compress_eval_then_embed_and_eval(st_folder, tmp_path, capsys, native_preferred):
    # --eval prepares the model (native few-row kernels swapped in, forced here) before it is compressed
    data = tmp_path / "data.txt"
    data.write_text("\n".join(MORE_TEXTS * 2) + "\n")
    out = tmp_path / "ckpt"
    assert main(["compress", "--model", str(st_folder), "--recipe", "w8a8-smoothquant", "--output", str(out),
                 "--eval", "--data", str(data), "--calib", str(data), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["modules"]) == 2 * 4 and {m["kind"] for m in manifest["modules"].values()} == {"w8a8"}
    quality = manifest["quality"]
    assert result["quality"] == quality and quality["texts"] == 10  # the lines of four words or more
    assert 0.99 <= quality["mean_cosine"] < 1 and quality["min_cosine"] <= quality["mean_cosine"]
    assert -1 <= quality["similarity_spearman"] <= 1
    assert main(["embed", "--model", str(out), "--output", str(tmp_path / "e.npy"), *MORE_TEXTS]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), Encoder(out).encode(MORE_TEXTS), atol=1e-6)
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--reference", str(st_folder), "--data", str(data), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["mean_cosine"] == pytest.approx(quality["mean_cosine"], abs=1e-6)


def test_cli_refuses_export_for_encoders(st_folder, tmp_path, capsys):
    assert main(["compress", "--model", str(st_folder), "--recipe", "int8", "--output", str(tmp_path / "o"),
                 "--export", "hf"]) != 0
    assert "--export hf" in capsys.readouterr().err


@pytest.mark.slow
def test_minilm_int8_and_w8a8_keep_embeddings(tmp_path):
    from miaotui.eval.embeddings import eval_texts

    texts = eval_texts(None, limit=None)[0][:32]  # WikiText paragraphs (the bench measures all 100)
    fp32 = Encoder().encode(texts)
    for recipe in ("int8", "w8a8-smoothquant"):
        out = tmp_path / recipe
        assert main(["compress", "--model", str(Encoder().loaded.path), "--recipe", recipe, "--output", str(out),
                     "--json"]) == 0
        cos = cosines(Encoder(out).encode(texts), fp32)
        assert cos.mean() >= 0.99, (recipe, cos.mean())
        assert (out / "modules.json").is_file()


def test_layers_dropped_then_distilled_in_one_recipe(st_folder, tmp_path):
    """prune-layers → distill (on a text file) → int8, through run_recipe: the distilled student is closer to
    the source than the pruned one on the step's own held-out texts, and the checkpoint reloads."""
    pytest.importorskip("miaotui.compress.prune.structured")
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(MORE_TEXTS * 8) + "\n")
    recipe = {"steps": [{"prune-layers": {"count": 1}},
                        {"distill": {"steps": 30, "lr": 3e-3, "batch_size": 4, "data": str(data)}},
                        {"quantize": {"method": "rtn", "bits": 8, "group_size": None, "symmetric": True}}]}
    _, before = compress(st_folder, recipe, tmp_path / "ckpt")
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    distilled = manifest["recipe"]["records"][1]
    assert distilled["step"] == "distill"
    assert distilled["after"]["mean_cosine"] > distilled["before"]["mean_cosine"]
    np.testing.assert_allclose(Encoder(tmp_path / "ckpt").encode(MORE_TEXTS), before, atol=1e-6)


def test_encoder_distill_needs_text(st_folder):
    ctx = Context(load_encoder(st_folder), progress=False)
    with pytest.raises(RecipeError, match="real text"):
        run_recipe(ctx, {"steps": [{"distill": {"steps": 1}}]})
