"""compress → checkpoint → load: identical logits; corrupt or mismatched checkpoints fail clearly;
the dequantized HF export loads in transformers; the CLI runs end to end."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from miaotui.cli.main import main
from miaotui.compress.quant.qlinear import QuantLinear
from miaotui.compress.recipe import Calibration, Context, RecipeError, load_recipe, run_recipe
from miaotui.errors import ModelLoadError
from miaotui.loading import load
from miaotui.loading.checkpoint import save_checkpoint, source_identity

IDS = torch.tensor([[5, 77, 123, 9, 200, 31, 64, 250, 18, 3, 99, 141]])


def compress(folder, recipe: str, out):
    loaded = load(folder)
    # calibrating recipes (the built-in int8 is GPTQ) on a little self-generated text: seconds, not minutes
    ctx = Context(loaded, Calibration(samples=8, seq_len=64), progress=False)
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


def _int8_recipe(tmp_path, params: str):
    r = tmp_path / "int8.yaml"
    r.write_text(f"name: int8-mine\nsteps:\n  - quantize: {{{params}}}\n")
    return str(r)


@pytest.mark.parametrize("arch", ["llama-mha-tied", "qwen2-bias"])
def test_grouped_int8_checkpoint_roundtrip(hf_folder, tmp_path, arch):
    """Group-wise int8 layers and a grouped tied head/embedding: saved, reloaded, identical logits, equal to
    the source with the dequantized weights put back."""
    from safetensors.torch import load_file

    folder, _ = hf_folder(arch)
    recipe = _int8_recipe(tmp_path, "method: rtn, bits: 8, group_size: 32, head_group_size: 16")
    q = compress(folder, recipe, tmp_path / "ckpt")
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    groups = {n: s.get("group_size") for n, s in manifest["modules"].items()}
    assert all(s["kind"] == "int8" for s in manifest["modules"].values())
    assert groups.pop("lm_head") == 16 and set(groups.values()) == {32}
    tensors = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert tensors["lm_head.scale"].shape == (q.model.lm_head.out_features, 64 // 16)
    with torch.inference_mode():
        before = q.model(IDS)
        back = load(tmp_path / "ckpt")
        torch.testing.assert_close(back.model(IDS), before, atol=0, rtol=0)
        from miaotui.engine.prepare import prepare_for_inference

        prepared = prepare_for_inference(back.model)  # the kernels chosen for this machine, few and many rows
        torch.testing.assert_close(prepared(IDS[:, :3]), before[:, :3], atol=1e-4, rtol=1e-4)
        ref = fake_quantized(folder, q).model(IDS)
    torch.testing.assert_close(before, ref, atol=1e-4, rtol=1e-4)


def test_per_channel_int8_checkpoint_keeps_the_old_format_and_loads(hf_folder, tmp_path):
    """A per-channel int8 checkpoint is written exactly as before group-wise int8 existed (no group_size in
    the manifest, 1-D scales), so checkpoints from earlier versions load unchanged."""
    from safetensors.torch import load_file

    folder, _ = hf_folder("llama-mha-tied")
    q = compress(folder, _int8_recipe(tmp_path, "method: rtn, bits: 8, group_size: null"), tmp_path / "old")
    manifest = json.loads((tmp_path / "old" / "manifest.json").read_text())
    for spec in manifest["modules"].values():
        assert set(spec) - {"tied_embedding"} == {"kind", "in_features", "out_features", "bias"}
    tensors = load_file(str(tmp_path / "old" / "model.safetensors"))
    assert all(t.dim() == 1 for k, t in tensors.items() if k.endswith(".scale"))
    with torch.inference_mode():
        back = load(tmp_path / "old")
        assert not any(getattr(m, "grouped", False) for m in back.model.modules())
        torch.testing.assert_close(back.model(IDS), q.model(IDS), atol=0, rtol=0)


def test_int8_group_recipe_errors(hf_folder, tmp_path):
    folder, _ = hf_folder("llama-gqa-untied")  # hidden 64, intermediate 128

    def run(params: str):
        run_recipe(Context(load(folder), progress=False), load_recipe(_int8_recipe(tmp_path, params)))

    with pytest.raises(RecipeError, match="symmetric must be true with bits 8"):
        run("method: rtn, bits: 8, group_size: 32, symmetric: false")
    with pytest.raises(RecipeError, match="symmetric must be true with bits 8"):
        run("method: gptq, bits: 4, overrides: {'*.down_proj': {bits: 8, symmetric: false}}")
    with pytest.raises(RecipeError, match="group_size must be null .* or a positive integer"):
        run("method: rtn, bits: 8, group_size: 0")
    # 8 divides every width and stays 8: not a whole number of the kernel's 16-column blocks
    with pytest.raises(RecipeError, match="group_size 8 becomes 8 .* multiple of 16"):
        run("method: rtn, bits: 8, group_size: 8")
    with pytest.raises(RecipeError, match=r"head_group_size.*group_size 8 becomes 8 on lm_head"):
        run("method: rtn, bits: 8, head_group_size: 8")
    with pytest.raises(RecipeError, match="head_group_size must be null .* or a positive integer"):
        run("method: rtn, bits: 8, head_group_size: '32'")
    with pytest.raises(RecipeError, match="head_group_size applies to an int8 head only"):
        run("method: rtn, bits: 8, head: none, head_group_size: 32")


def test_int8_overrides_inherit_an_int8_steps_group(hf_folder, tmp_path):
    """In an int8 step an override without group_size keeps the step's group; in an int4 step an 8-bit
    override is per channel unless it names a group."""
    folder, _ = hf_folder("llama-gqa-untied")
    ctx = Context(load(folder), progress=False)
    run_recipe(ctx, load_recipe(_int8_recipe(
        tmp_path, "method: rtn, bits: 8, group_size: 32, overrides: {'*.down_proj': {symmetric: true}, "
                  "'*.o_proj': {group_size: 16}}")))
    assert {n: s.get("group_size") for n, s in ctx.modules.items() if "down_proj" in n} == \
        {"model.layers.0.mlp.down_proj": 32, "model.layers.1.mlp.down_proj": 32}
    assert all(s["group_size"] == 16 for n, s in ctx.modules.items() if "o_proj" in n)
    assert ctx.modules["lm_head"]["group_size"] == 32  # an int8 step's head follows its group unless told
    ctx = Context(load(folder), progress=False)
    run_recipe(ctx, load_recipe(_int8_recipe(
        tmp_path, "method: rtn, bits: 4, group_size: 32, overrides: {'*.down_proj': {bits: 8}, "
                  "'*.o_proj': {bits: 8, group_size: 16}}")))
    kinds = {n: (s["kind"], s.get("group_size")) for n, s in ctx.modules.items() if n != "lm_head"}
    assert {v for n, v in kinds.items() if "down_proj" in n} == {("int8", None)}
    assert {v for n, v in kinds.items() if "o_proj" in n} == {("int8", 16)}
    assert {v for n, v in kinds.items() if "qkv_proj" in n} == {("int4", 32)}


def test_loaded_checkpoint_tensors_are_64_byte_aligned(hf_folder, tmp_path):
    """safetensors maps the file and aligns each tensor to 8 bytes; a misaligned int8 weight crashed PyTorch's
    AVX-512 int8 kernel (aligned 16-byte loads), so loading copies misaligned tensors."""
    from safetensors.torch import load_file

    from miaotui.loading.checkpoint import ALIGN, read_checkpoint

    folder, _ = hf_folder("llama-gqa-untied")
    compress(folder, "int8", tmp_path / "ckpt")
    mapped = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert any(t.data_ptr() % ALIGN for t in mapped.values())  # the file's own layout does misalign some
    _, _, tensors = read_checkpoint(tmp_path / "ckpt")
    assert tensors.keys() == mapped.keys()
    for name, t in tensors.items():
        assert t.data_ptr() % ALIGN == 0, name
        assert torch.equal(t, mapped[name])
