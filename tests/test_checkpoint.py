"""compress → checkpoint → load: identical logits; corrupt or mismatched checkpoints fail clearly;
the dequantized HF export loads in transformers; the CLI runs end to end."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from miaotui.cli.main import main
from miaotui.compress.quant.qlinear import QuantLinear
from miaotui.compress.recipe import Context, RecipeError, load_recipe, run_recipe
from miaotui.errors import ModelLoadError
from miaotui.loading import load
from miaotui.loading.checkpoint import save_checkpoint, source_identity

IDS = torch.tensor([[5, 77, 123, 9, 200, 31, 64, 250, 18, 3, 99, 141]])


def compress(folder, recipe: str, out):
    loaded = load(folder)
    ctx = Context(loaded, progress=False)
    rec = load_recipe(recipe)
    run_recipe(ctx, rec)
    save_checkpoint(out, loaded.model, loaded.tokenizer, loaded.config, ctx.modules, rec, source_identity(loaded.path))
    return loaded


def fake_quantized(folder, loaded_q):
    """The source model with every quantized module's dequantized weight put back into an nn.Linear."""
    ref = load(folder)
    ref.model.fuse()
    for name, m in loaded_q.model.named_modules():
        if isinstance(m, QuantLinear):
            ref.model.get_submodule(name).weight.data = m.dequantize()
    if "lm_head" in dict(loaded_q.model.named_modules()) and isinstance(loaded_q.model.lm_head, QuantLinear):
        w = loaded_q.model.lm_head.dequantize()
        ref.model.lm_head.weight = nn.Parameter(w, requires_grad=False)
        tied = [n for n, mod in ref.model.named_modules() if isinstance(mod, nn.Embedding)
                and mod.weight.shape == w.shape and getattr(ref.model.args, "tie_word_embeddings", False)]
        for n in tied[:1]:
            ref.model.get_submodule(n).weight = ref.model.lm_head.weight
    return ref


@pytest.mark.parametrize("arch", ["llama-gqa-untied", "llama-mha-tied", "qwen2-bias", "gpt2"])
@pytest.mark.parametrize("recipe", ["int8", "int4-rtn", "int4-g32"])
def test_save_load_identical_and_equal_to_fake_quant(hf_folder, tmp_path, arch, recipe):
    folder, _ = hf_folder(arch)
    q = compress(folder, recipe, tmp_path / "ckpt")
    with torch.inference_mode():
        before = q.model(IDS)
        back = load(tmp_path / "ckpt")
        assert back.format == "miaotui" and back.manifest["recipe"]["name"] == recipe
        torch.testing.assert_close(back.model(IDS), before, atol=0, rtol=0)
        ref = fake_quantized(folder, q).model(IDS)
    torch.testing.assert_close(before, ref, atol=1e-4, rtol=1e-4)


def test_int4_checkpoint_is_small(hf_folder, tmp_path):
    folder, _ = hf_folder("llama-gqa-untied")
    compress(folder, "int4-rtn", tmp_path / "c")
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    fp32 = sum(p.numel() * 4 for p in load(folder).model.parameters())
    layer_share = manifest["weights"]["bytes"] / fp32
    assert layer_share < 0.6  # a tiny model is dominated by its (fp32) embedding; the real ratio is in BENCHMARKS


def _rewrite_manifest(path, edit):
    m = json.loads((path / "manifest.json").read_text())
    edit(m)
    (path / "manifest.json").write_text(json.dumps(m))


def test_corrupt_or_mismatched_checkpoints_fail_clearly(hf_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    from miaotui.loading.checkpoint import file_sha256

    folder, _ = hf_folder("llama-gqa-untied")
    good = tmp_path / "good"
    compress(folder, "int4-rtn", good)

    def variant(name):
        import shutil

        d = tmp_path / name
        shutil.copytree(good, d)
        return d

    d = variant("sha")  # weights changed after writing
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ModelLoadError, match="sha256"):
        load(d)

    d = variant("missing")  # a tensor removed (and the hash updated, as a careless tool would)
    t = load_file(str(d / "model.safetensors"))
    t.pop("model.layers.0.mlp.down_proj.scale")
    save_file(t, str(d / "model.safetensors"))
    _rewrite_manifest(d, lambda m: m["weights"].update(sha256=file_sha256(d / "model.safetensors")))
    with pytest.raises(ModelLoadError, match="missing .*down_proj.scale"):
        load(d)

    d = variant("group")  # the manifest's group size edited: shapes no longer match
    _rewrite_manifest(d, lambda m: m["modules"]["model.layers.0.mlp.down_proj"].update(group_size=32))
    with pytest.raises(ModelLoadError, match="down_proj"):
        load(d)

    d = variant("name")  # a module this architecture does not have
    _rewrite_manifest(d, lambda m: m["modules"].update({"model.layers.9.mlp.down_proj": {"kind": "int8"}}))
    with pytest.raises(ModelLoadError, match="layers.9"):
        load(d)

    d = variant("json")
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="manifest"):
        load(d)


def test_hf_export_loads_in_transformers(hf_folder, tmp_path):
    import transformers

    for arch in ("llama-mha-tied", "gpt2"):
        q = compress(hf_folder(arch)[0], "int4-rtn", tmp_path / arch)
        from miaotui.loading.export import export_hf

        export_hf(q.model, q.config, q.tokenizer, tmp_path / arch / "hf")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / arch / "hf").eval()
        with torch.inference_mode():
            torch.testing.assert_close(hf(IDS).logits, q.model(IDS), atol=1e-4, rtol=1e-4)


def test_recipe_errors(tmp_path):
    with pytest.raises(RecipeError, match="neither a built-in"):
        load_recipe("int3")
    bad = tmp_path / "r.yaml"
    bad.write_text("steps:\n  - quantize: {method: gptq, bitz: 4}\n")
    rec = load_recipe(str(bad))
    with pytest.raises(RecipeError, match="bitz"):
        run_recipe(Context(load_or_none(), progress=False), rec)
    bad.write_text("steps:\n  - frobnicate: {}\n")
    with pytest.raises(RecipeError, match="frobnicate"):
        load_recipe(str(bad))
    bad.write_text("steps: [")
    with pytest.raises(RecipeError, match="YAML"):
        load_recipe(str(bad))


def load_or_none():
    class _Loaded:  # the step validates its parameters before touching the model
        model = nn.Module()
        model.fuse = lambda: None
    return _Loaded()


def test_yaml_recipe_and_cli(hf_folder, tmp_path, capsys):
    folder, _ = hf_folder("llama-gqa-untied")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: mine\nsteps:\n  - quantize: {method: rtn, bits: 4, group_size: 32, head: none}\n")
    data = tmp_path / "text.txt"
    data.write_text("The capital of France is Paris. Hello world, hello there! " * 200)
    out = tmp_path / "ck"
    assert main(["compress", "--model", str(folder), "--recipe", str(recipe), "--output", str(out), "--eval",
                 "--data", str(data), "--ctx", "64", "--windows", "4", "--export", "hf", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["recipe"] == "mine" and 0 <= result["quality"]["top1_agreement"] <= 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quality"]["kld_mean"] == result["quality"]["kld_mean"]
    assert "lm_head" not in manifest["modules"] and all(s["group_size"] == 32 for s in manifest["modules"].values())
    assert (out / "hf" / "config.json").is_file()
    assert main(["generate", "--model", str(out), "--temperature", "0", "--max-tokens", "5", "--json", "Hello"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["completion_tokens"] >= 1


@pytest.mark.parametrize("recipe", ["int8", "int4-rtn"])
def test_quantized_compiled_decode_equals_eager(hf_folder, tmp_path, recipe):
    """The packed kernels run inside the compiled decode graph and give the eager path's tokens."""
    from miaotui.config import SamplingParams
    from miaotui.engine.generate import generate_tokens
    from miaotui.engine.prepare import prepare_for_inference
    from miaotui.engine.runner import Runner

    folder, _ = hf_folder("llama-gqa-untied")
    compress(folder, recipe, tmp_path / "c")
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompt = [5, 17, 42, 99, 7]
    eager_model = prepare_for_inference(load(tmp_path / "c").model)
    eager = list(generate_tokens(eager_model, prompt, params))
    runner = Runner(prepare_for_inference(load(tmp_path / "c").model), compile=True)
    assert list(generate_tokens(runner, prompt, params)) == eager
