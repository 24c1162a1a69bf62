"""Knowledge distillation: the losses against fp64 formulas, the loop's schedule, students built from teacher
layers, KL falling on held-out windows, sparsity masks kept, resume == uninterrupted, encoders pulled towards
their teacher's embeddings, and the CLI / recipe paths end to end on tiny random models."""

from __future__ import annotations

import json
import math

import pytest
import torch

from miaotui.cli.main import main
from miaotui.compress.distill import (
    DistillConfig, DistillError, distill, distill_encoder, encoder_subset, layer_subset,
)
from miaotui.compress.distill.loop import item_order, lr_at
from miaotui.compress.distill.losses import embedding_loss, hidden_state_loss, kl_loss
from miaotui.compress.distill.student import (
    blocks, default_layer_map, kept_layers_from_records, match_layers, parse_layers,
)
from miaotui.loading import load

TEXT = ("The capital of France is Paris. Hello world, hello there! Once upon a time a cat sat on the mat. "
        "The dog is on a mat, the cat is on the dog. ") * 40


# ---- tiny models

@pytest.fixture
def teacher(hf_folder):
    """A 2-layer llama whose matrices are scaled up so its next-token distributions are peaked (a random
    model's are nearly uniform, which leaves almost nothing to distil)."""
    path, _ = hf_folder("llama-gqa-untied")
    t = load(path)
    t.model.fuse()
    with torch.no_grad():
        for p in t.model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return t


def windows(n=40, t=32, seed=1):
    return torch.randint(0, 320, (n, t), generator=torch.Generator().manual_seed(seed))


# ---- losses and schedule against plain formulas

def test_kl_loss_matches_fp64_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g) * 3, torch.randn(2, 5, 11, generator=g) * 3
    for temp in (1.0, 2.5):
        p = torch.softmax(t.double() / temp, -1)
        q = torch.softmax(s.double() / temp, -1)
        want = (p * (p.log() - q.log())).sum(-1).mean() * temp ** 2
        assert kl_loss(s, t, temp).item() == pytest.approx(want.item(), rel=1e-5)
    assert kl_loss(t, t, 2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_hidden_and_embedding_losses_match_formulas():
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(2, 3, 8, generator=g) for _ in range(2)]
    t = [torch.randn(2, 3, 8, generator=g) * 5 for _ in range(2)]
    want = sum((((a - b) ** 2).sum(-1) / (b ** 2).sum(-1)).mean() for a, b in zip(s, t)) / 2
    assert hidden_state_loss(s, t).item() == pytest.approx(want.item(), rel=1e-5)
    a, b = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    assert embedding_loss(a, b).item() == pytest.approx((1 - cos).mean().item(), rel=1e-5)
    assert embedding_loss(a, b, 0.0, 2.0).item() == pytest.approx(2 * ((a - b) ** 2).mean().item(), rel=1e-5)


def test_lr_schedule_and_data_order():
    cfg = DistillConfig(steps=100, lr=1e-3, warmup=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # warmup rises to the peak
    assert lrs[10] == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-4)  # cosine ends at min_lr_ratio * lr
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    # every pass visits each item once; the stream depends on the seed and the position alone
    stream = item_order(7, 3, 0, 21)
    assert [sorted(stream[i:i + 7]) for i in (0, 7, 14)] == [list(range(7))] * 3
    assert item_order(7, 3, 5, 9) == stream[5:14]


def test_config_errors_name_the_parameter():
    for bad, name in [(dict(lr=0), "lr"), (dict(steps=0), "steps"), (dict(holdout=1.0), "holdout"),
                      (dict(temperature=-1), "temperature"), (dict(grad_accum=0), "grad_accum")]:
        with pytest.raises(DistillError) as e:
            DistillConfig(**bad)
        assert e.value.param == name and name in str(e.value)
    with pytest.raises(DistillError, match="unknown parameter"):
        DistillConfig.from_params({"steps": 3, "learning_rate": 1e-3})


# ---- students from teacher layers

def test_layer_subset_is_the_teacher_without_those_layers(teacher):
    student = layer_subset(teacher.model, [1])
    assert len(blocks(student)) == 1 and student.args.num_hidden_layers == 1
    assert len(blocks(teacher.model)) == 2  # the teacher is untouched
    assert student.lm_head.weight is not teacher.model.lm_head.weight
    # reference: the teacher's own forward with layer 0 skipped
    ids = windows(2, 12)
    t = teacher.model
    x = t.model.embed_tokens(ids)
    x = t.model.layers[1](x, t.rope_cos[:12], t.rope_sin[:12], 0)
    want = t.lm_head(t.model.norm(x))
    torch.testing.assert_close(student(ids), want)
    assert match_layers(student, teacher.model) == [1]
    assert parse_layers("2", 6) == [0, 5] and parse_layers("0,3", 6) == [0, 3] and parse_layers(3, 6) == [0, 2, 5]
    with pytest.raises(DistillError):
        parse_layers("3,1", 6)
    assert default_layer_map(2, 6) == {0: 2, 1: 5}
    assert kept_layers_from_records([{"step": "prune-layers", "dropped": [1, 2]}], 5) == [0, 3, 4]
    # a distill record names teacher layers, so a second one (continued training) replaces, not composes
    twice = [{"step": "distill", "teacher_layers": [0, 2, 5]}, {"step": "distill", "teacher_layers": [0, 2, 5]}]
    assert kept_layers_from_records(twice, 6) == [0, 2, 5]
    assert kept_layers_from_records(twice + [{"step": "prune-layers", "kept": [0, 2]}], 6) == [0, 5]


# ---- decoders

def test_distillation_lowers_heldout_kl_of_a_layer_dropped_student(teacher):
    student = layer_subset(teacher.model, [1])
    r = distill(student, teacher.model, windows(), steps=20, lr=3e-3, batch_size=4, temperature=1.0,
                progress=False)
    assert r.holdout_items == 4 and r.train_items == 36 and r.steps == 20
    assert r.after["kl"] < 0.75 * r.before["kl"], (r.before, r.after)
    assert r.loss_last < r.loss_first
    # only the student trained: the teacher's held-out perplexity is the same before and after
    assert r.after["teacher_perplexity"] == r.before["teacher_perplexity"]
    assert not any(p.requires_grad for p in student.parameters())  # back to inference


def test_hidden_loss_uses_the_layer_map(teacher):
    student = layer_subset(teacher.model, [1])
    r = distill(student, teacher.model, windows(), steps=10, lr=3e-3, hidden_loss=1.0, layer_map={0: 1},
                progress=False)
    assert r.layer_map == {0: 1} and r.after["kl"] < r.before["kl"]
    with pytest.raises(DistillError, match="layer_map"):
        distill(layer_subset(teacher.model, [1]), teacher.model, windows(), steps=2, hidden_loss=1.0,
                layer_map={0: 5}, progress=False)


def test_zero_weights_stay_zero(teacher):
    student = layer_subset(teacher.model, [0, 1])
    g = torch.Generator().manual_seed(0)
    lin = student.model.layers[0].mlp.down_proj
    qkv = student.model.layers[1].self_attn.qkv_proj
    with torch.no_grad():
        lin.weight.mul_(torch.rand(lin.weight.shape, generator=g) > 0.5)  # unstructured 50 %
        w = qkv.weight.view(-1, 4)  # 2:4 — the two smallest of every four
        w.scatter_(1, w.abs().argsort(1)[:, :2], 0.0)
    zeros = {n: p == 0 for n, p in student.named_parameters() if p.dim() == 2}
    before = {n: p.clone() for n, p in student.named_parameters()}
    r = distill(student, teacher.model, windows(), steps=5, lr=1e-2, progress=False)
    assert r.masked_zeros == int(zeros["model.layers.0.mlp.down_proj.weight"].sum() +
                                 zeros["model.layers.1.self_attn.qkv_proj.weight"].sum())
    for n, p in student.named_parameters():
        if p.dim() == 2:
            assert (p[zeros[n]] == 0).all(), n
    assert not torch.equal(lin.weight, before["model.layers.0.mlp.down_proj.weight"])  # the rest trained
    torch.testing.assert_close(student.model.embed_tokens.weight, before["model.embed_tokens.weight"],
                               rtol=0, atol=0)  # embeddings frozen by default


def test_resume_gives_the_uninterrupted_result(teacher, tmp_path):
    kw = dict(steps=6, lr=3e-3, batch_size=2, grad_accum=2, holdout=0.0, temperature=2.0, hidden_loss=0.5)
    data = windows()
    straight = layer_subset(teacher.model, [1])
    r_a = distill(straight, teacher.model, data, progress=False, **kw)

    calls = {"n": 0}

    def interrupt(module, inputs):  # Ctrl-C in the 4th step's first teacher forward
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt

    state = tmp_path / "state.pt"
    interrupted = layer_subset(teacher.model, [1])
    handle = teacher.model.register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        distill(interrupted, teacher.model, data, state_path=state, progress=False, save_every=2, **kw)
    handle.remove()
    assert torch.load(state, weights_only=True)["step"] == 3  # saved on Ctrl-C after the last whole step
    resumed = layer_subset(teacher.model, [1])  # a fresh process: the student rebuilt the same way
    r_b = distill(resumed, teacher.model, data, state_path=state, resume=True, progress=False, save_every=2, **kw)
    assert r_b.resumed_from == 3 and r_b.steps == 6
    assert r_b.loss_last == r_a.loss_last
    for (n, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n
    with pytest.raises(DistillError, match="lr"):  # other settings: refused, naming them
        distill(layer_subset(teacher.model, [1]), teacher.model, data, state_path=state, resume=True,
                progress=False, **{**kw, "lr": 1e-3})


def test_cli_decoder_student_layers_saves_a_loadable_checkpoint(hf_folder, tmp_path, capsys):
    path, _ = hf_folder("llama-gqa-untied")
    data = tmp_path / "train.txt"
    data.write_text(TEXT)
    out = tmp_path / "out"
    args = ["distill", "--model", str(path), "--student-layers", "1", "--output", str(out), "--data", str(data),
            "--steps", "4", "--seq-len", "16", "-b", "2", "--save-every", "2", "--keep-state",
            "--hidden-loss", "1", "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["distill"]["steps"] == 4 and result["distill"]["layer_map"] == {"0": 1}
    lm = load(out)
    assert lm.config["num_hidden_layers"] == 1 and len(blocks(lm.model)) == 1
    assert lm.manifest["recipe"]["records"][-1]["teacher_layers"] == [1]
    logits = lm.model(windows(1, 8))
    assert torch.isfinite(logits).all()
    # resuming a finished run trains nothing more and writes the same weights
    weights = (out / "model.safetensors").read_bytes()
    assert main(args + ["--resume"]) == 0
    assert (out / "model.safetensors").read_bytes() == weights
    # errors are one line and exit 1
    assert main(["distill", "--model", str(path), "--output", str(tmp_path / "o2"), "--steps", "2"]) == 1
    assert main(["distill", "--model", str(path), "--student-layers", "1", "--output", str(tmp_path / "o3"),
                 "--resume"]) == 1
    assert "--resume" in capsys.readouterr().err


def test_recipe_prune_distill_quantize_reloads_and_generates(hf_folder, tmp_path):
    pytest.importorskip("miaotui.compress.prune.structured")
    from miaotui import LLM, SamplingParams

    path, _ = hf_folder("llama-gqa-untied")
    data = tmp_path / "calib.txt"
    data.write_text(TEXT)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: prune-distill-int8\nsteps:\n"
        "  - prune-layers: {layers: [0]}\n"
        f"  - distill: {{steps: 15, lr: 0.003, batch_size: 2, seq_len: 16, hidden_loss: 1.0, data: {data}}}\n"
        "  - quantize: {method: rtn, bits: 8, group_size: null, symmetric: true}\n")
    out = tmp_path / "ck"
    assert main(["compress", "--model", str(path), "--recipe", str(recipe), "--output", str(out),
                 "--calib", str(data), "--calib-len", "16", "--calib-samples", "8"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    rec = next(r for r in manifest["recipe"]["records"] if r["step"] == "distill")
    assert rec["teacher_layers"] == [1] and rec["layer_map"] == {"0": 1}  # found through the norm weights
    assert rec["after"]["kl"] < rec["before"]["kl"]
    llm = LLM(str(out))
    assert len(blocks(llm.loaded.model)) == 1
    text = llm.generate("The capital of", SamplingParams(temperature=0, max_tokens=8)).text
    assert isinstance(text, str) and len(llm.loaded.tokenizer(text).input_ids) > 0


def test_recipe_distill_errors_name_the_parameter(hf_folder):
    from miaotui.compress.recipe import Context, RecipeError, run_recipe

    path, _ = hf_folder("llama-gqa-untied")
    ctx = Context(load(path), progress=False)
    with pytest.raises(RecipeError, match="distill: lr"):
        run_recipe(ctx, {"name": "x", "steps": [{"distill": {"lr": -1}}]})
    with pytest.raises(RecipeError, match="learning_rate"):
        run_recipe(ctx, {"name": "x", "steps": [{"distill": {"learning_rate": 1}}]})


# ---- encoders

WORDS = ["the", "cat", "dog", "sat", "on", "mat", "a", "is", "paris", "capital", "of", "france", "."]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    """A 4-layer BERT in a sentence-transformers folder (mean pooling, normalised), WordPiece tokenizer."""
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = SPECIALS + WORDS
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer = transformers.BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                               cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                  num_attention_heads=4, max_position_embeddings=64)
    model = transformers.BertModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("bert-st")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    (path / "2_Normalize").mkdir()
    return path


def sentences(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(k),), generator=g).tolist())
            for k in torch.randint(3, 14, (n,), generator=g)]


def test_encoder_distillation_raises_cosine(bert_folder):
    from miaotui.loading.encoder import load_encoder

    teacher = load_encoder(bert_folder)
    student = encoder_subset(teacher, [0, 3])
    assert student.config["num_hidden_layers"] == 2 and len(teacher.model.layers) == 4
    r = distill_encoder(student, teacher, sentences(80, 0), steps=30, lr=3e-3, batch_size=8, holdout=0.2,
                        progress=False)
    gap_before, gap_after = 1 - r.before["mean_cosine"], 1 - r.after["mean_cosine"]
    assert gap_after < 0.5 * gap_before, (r.before, r.after)
    assert r.holdout_items == 16


def test_encoder_cli_writes_a_folder_equal_to_transformers(bert_folder, tmp_path):
    import transformers

    from miaotui.encoder import Encoder

    data = tmp_path / "texts.txt"
    data.write_text("\n".join(sentences(40, 1)))
    out = tmp_path / "enc"
    assert main(["distill", "--model", str(bert_folder), "--student-layers", "0,3", "--output", str(out),
                 "--data", str(data), "--steps", "5", "-b", "8", "--lr", "3e-3", "--eval", "--eval-data",
                 str(data)]) == 0
    record = json.loads((out / "distill.json").read_text())
    assert record["quality"]["mean_cosine"] > record["quality"]["before"]["mean_cosine"]
    enc = Encoder(str(out))
    assert len(enc.model.layers) == 2 and enc.loaded.pooling.normalize
    texts = sentences(5, 2)
    ours = enc.encode(texts)
    # reference: transformers reads the same folder; mean pooling + normalisation by hand
    hf = transformers.BertModel.from_pretrained(out).eval()
    batch = enc.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = hf(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    want = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    torch.testing.assert_close(torch.from_numpy(ours), want, atol=1e-5, rtol=1e-4)


def test_encoder_cli_continues_a_student_with_its_layer_map(bert_folder, tmp_path, capsys):
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(sentences(40, 3)))
    first, second, third = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    common = ["--model", str(bert_folder), "--data", str(data), "--steps", "2", "-b", "8", "--holdout", "0"]
    assert main(["distill", "--student-layers", "0,3", "--output", str(first), *common]) == 0
    # the student's weights changed, so only its record says layers 0 and 3 are where it came from
    assert main(["distill", "--student", str(first), "--output", str(second), "--hidden-loss", "1", *common]) == 0
    rec = json.loads((second / "distill.json").read_text())["recipe"]
    assert rec["name"] == "distill+distill" and len(rec["records"]) == 2
    assert rec["records"][1]["teacher_layers"] == [0, 3]
    assert rec["records"][1]["layer_map"] == {"0": 0, "1": 3}
    # an explicit --teacher-layers wins over the record
    assert main(["distill", "--student", str(second), "--output", str(third), "--hidden-loss", "1",
                 "--teacher-layers", "1,2", *common]) == 0
    assert json.loads((third / "distill.json").read_text())["recipe"]["records"][2]["layer_map"] == {"0": 1, "1": 2}
    for bad in (["--student", str(first), "--teacher-layers", "1"], ["--student", str(first), "--teacher-layers", "x"],
                ["--student-layers", "0,3", "--teacher-layers", "0,3"]):
        assert main(["distill", *bad, "--output", str(tmp_path / "bad"), *common]) != 0
        assert "teacher-layers" in capsys.readouterr().err


# ---- real models (short)

@pytest.mark.slow
def test_real_minilm_half_the_layers_distils_towards_the_original():
    from miaotui.loading.encoder import load_encoder

    try:
        teacher = load_encoder(None)
    except Exception as e:  # the default encoder package is not installed
        pytest.skip(str(e))
    from miaotui.eval.data import default_data_path
    from miaotui.compress.distill.data import read_texts

    # the first ~60 tokens of the 100 WikiText paragraphs (short, so the test stays short); 20 % held out
    texts = [p[:300] for p in read_texts(default_data_path())]
    student = encoder_subset(teacher, [0, 2, 5])
    r = distill_encoder(student, teacher, texts, steps=8, lr=3e-4, batch_size=8, holdout=0.2, progress=False)
    assert r.after["mean_cosine"] > r.before["mean_cosine"] + 0.01, (r.before, r.after)
    assert math.isfinite(r.loss_last)
