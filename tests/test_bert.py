"""BERT-family encoders against transformers: tiny random models built here, saved as real folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from miaotui.cli.main import main
from miaotui.encoder import Encoder, MissingHeadError, TruncationWarning
from miaotui.errors import MiaotuiError, PromptTooLongError
from miaotui.loading.encoder import load_encoder

WORDS = ["the", "cat", "dog", "sat", "on", "mat", "a", "is", "paris", "capital", "of", "france", "."]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = SPECIALS + WORDS + list("abcdefghijklmnopqrstuvwxyz") + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
TINY = dict(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=40, num_labels=3)
ARCHS = {  # name → (config class, model class)
    "bert": ("BertConfig", "BertModel"),
    "bert-mlm": ("BertConfig", "BertForMaskedLM"),
    "bert-cls": ("BertConfig", "BertForSequenceClassification"),
    "roberta": ("RobertaConfig", "RobertaModel"),
    "roberta-mlm": ("RobertaConfig", "RobertaForMaskedLM"),
    "roberta-cls": ("RobertaConfig", "RobertaForSequenceClassification"),
}
TEXTS = ["the cat sat on the mat", "a dog", "paris is the capital of france .", "cat", "the dog is on a mat ."]


def make_model(name: str):
    import transformers

    cfg_cls, model_cls = ARCHS[name]
    torch.manual_seed(0)
    extra = {"pad_token_id": 1, "type_vocab_size": 1} if name.startswith("roberta") else {"type_vocab_size": 2}
    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**TINY, **extra)).eval()
    with torch.no_grad():  # random init leaves biases/norms at 0/1: perturb so every weight matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def make_tokenizer():
    """A real BERT WordPiece tokenizer over VOCAB (built from parts: transformers 5 ignores ``vocab_file``)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]")


@pytest.fixture(scope="session")
def folder(tmp_path_factory):
    """name → (path, transformers model); a WordPiece tokenizer saved beside it."""
    cache = {}

    def get(name: str):
        if name not in cache:
            path = tmp_path_factory.mktemp(name)
            model = make_model(name)
            model.save_pretrained(path)
            make_tokenizer().save_pretrained(path)
            cache[name] = (path, model)
        return cache[name]

    return get


def sentence_transformers_folder(folder, tmp_path, modes: dict[str, bool], normalize: bool):
    import shutil

    path, model = folder("bert")
    st = tmp_path / "st"
    shutil.copytree(path, st)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (st / "modules.json").write_text(json.dumps(modules))
    (st / "1_Pooling").mkdir()
    (st / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **modes}))
    return st, model


def padded_inputs(vocab: int, pad: int, types: int):
    """A right-padded batch with token types: rows of 12, 7 and 3 real tokens."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 7:], mask[2, 3:] = 0, 0
    ids[mask == 0] = pad
    token_types = torch.randint(0, types, (3, 12), generator=g) * mask
    return ids, mask, token_types


@pytest.mark.parametrize("name", list(ARCHS))
def test_parity_with_transformers_padded_batch(folder, name):
    path, ref = folder(name)
    enc = Encoder(path)  # fused q/k/v, as used for real
    args = enc.model.args
    ids, mask, tt = padded_inputs(args.vocab_size, args.pad_token_id, args.type_vocab_size)
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask, token_type_ids=tt, output_hidden_states=True)
        hidden, batch = enc.model.forward_padded(ids, mask, tt)
    torch.testing.assert_close(hidden, out.hidden_states[-1][mask.bool()], atol=1e-4, rtol=1e-4)
    if name.endswith("-mlm"):
        torch.testing.assert_close(enc.model.mlm(hidden), out.logits[mask.bool()], atol=1e-4, rtol=1e-4)
    elif name.endswith("-cls"):
        torch.testing.assert_close(enc.model.classify(hidden, batch), out.logits, atol=1e-4, rtol=1e-4)
    elif name == "bert":  # the pooler is loaded too
        torch.testing.assert_close(enc.model.pooled_first(hidden, batch), out.pooler_output, atol=1e-4, rtol=1e-4)
    heads = {"bert": {"pooler"}, "roberta": {"pooler"}, "bert-mlm": {"mlm"}, "roberta-mlm": {"mlm"},
             "bert-cls": {"pooler", "classifier"}, "roberta-cls": {"classifier"}}[name]
    assert enc.model.heads == heads


@pytest.mark.parametrize("name", ["bert", "roberta"])
def test_packed_batch_equals_one_at_a_time(folder, name):
    enc = Encoder(folder(name)[0])
    texts = TEXTS * 3  # mixed lengths, several batches
    batched = enc.encode(texts, batch_size=4, normalize=False)
    alone = np.stack([enc.encode(t, normalize=False) for t in texts])
    np.testing.assert_allclose(batched, alone, atol=1e-5, rtol=1e-5)
    # and the packed forward equals the padded one token for token
    ids, types = enc.tokenize(texts[:5])
    with torch.no_grad():
        packed = enc.model(enc.model.pack(ids, types))
        width = max(map(len, ids))
        filler = enc.model.args.pad_token_id  # RoBERTa counts positions from the non-pad ids
        pad = torch.tensor([s + [filler] * (width - len(s)) for s in ids])
        m = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in ids])
        padded, _ = enc.model.forward_padded(pad, m)
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)


def st_pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """sentence-transformers' Pooling, written out from its definition on a padded batch."""
    m = mask[..., None].float()
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(m == 0, -1e9).max(1).values
    total = (hidden * m).sum(1)
    return total / m.sum(1) if mode == "mean" else total / m.sum(1).sqrt()


@pytest.mark.parametrize("modes,normalize", [
    ({"pooling_mode_mean_tokens": True}, True),
    ({"pooling_mode_cls_token": True}, False),
    ({"pooling_mode_max_tokens": True, "pooling_mode_mean_sqrt_len_tokens": True}, False),
])
def test_pooling_matches_sentence_transformers_definition(folder, tmp_path, modes, normalize):
    path, ref = sentence_transformers_folder(folder, tmp_path, modes, normalize)
    enc = Encoder(path)
    tok = enc.tokenizer
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = ref(**batch).last_hidden_state
    names = [n for n in ("cls", "max", "mean", "mean_sqrt_len") if modes.get(
        {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens", "mean": "pooling_mode_mean_tokens",
         "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens"}[n])]
    expected = torch.cat([st_pool(hidden, batch["attention_mask"], n) for n in names], dim=-1)
    if normalize:
        expected = torch.nn.functional.normalize(expected, dim=-1)
    got = enc.encode(TEXTS, batch_size=2)
    assert got.shape == (len(TEXTS), 32 * len(names))
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5, rtol=1e-4)


def test_fill_mask_and_classify_match_transformers(folder):
    path, ref = folder("bert-mlm")
    enc = Encoder(path)
    [cands] = enc.fill_mask("paris is the [MASK] of france .", top_k=3)
    batch = enc.tokenizer("paris is the [MASK] of france .", return_tensors="pt")
    with torch.no_grad():
        logits = ref(**batch).logits[0, 4]
    assert [c["token_id"] for c in cands] == logits.topk(3).indices.tolist()
    assert cands[0]["score"] == pytest.approx(logits.softmax(-1).max().item(), abs=1e-5)

    path, ref = folder("bert-cls")
    enc = Encoder(path)
    with torch.no_grad():
        probs = ref(**enc.tokenizer(TEXTS, padding=True, return_tensors="pt")).logits.softmax(-1)
    got = enc.classify(TEXTS, top_k=None, batch_size=2)
    for row, p in zip(got, probs):
        assert row[0]["label"] == f"LABEL_{p.argmax().item()}"
        assert sorted(x["score"] for x in row) == pytest.approx(sorted(p.tolist()), abs=1e-5)


def test_missing_heads_are_clear_errors(folder, capsys):
    path, _ = folder("bert")
    enc = Encoder(path)
    with pytest.raises(MissingHeadError, match="no masked-LM head"):
        enc.fill_mask("the [MASK] sat")
    with pytest.raises(MissingHeadError, match="no sequence-classification head"):
        enc.classify(["the cat"])
    assert main(["classify", "the cat", "-m", str(path)]) == 1
    assert "no sequence-classification head" in capsys.readouterr().err


def test_empty_and_overlong_inputs(folder, capsys):
    path, _ = folder("bert")
    enc = Encoder(path)
    for bad in ([], [""], ["the cat", "   "]):
        with pytest.raises(MiaotuiError, match="empty|no input"):
            enc.encode(bad)
    long = " ".join(["cat"] * 100)  # 102 tokens; the model takes 40
    with pytest.raises(PromptTooLongError, match="limit of 40"):
        enc.encode([long], truncate=False)
    with pytest.warns(TruncationWarning):
        cut = enc.encode([long])
    # truncation keeps [CLS] ... [SEP]: the same as embedding the first 38 words
    np.testing.assert_allclose(cut, enc.encode([" ".join(["cat"] * 38)]), atol=1e-6)
    assert main(["embed", "", "-m", str(path)]) == 1
    assert "input 0 is empty" in capsys.readouterr().err
    assert main(["embed", long, "-m", str(path), "--no-truncate"]) == 1
    assert "more than the model's limit" in capsys.readouterr().err
    assert main(["embed", long, "-m", str(path)]) == 0
    assert "were truncated" in capsys.readouterr().err


def test_cli_embed_writes_npy_and_jsonl(folder, tmp_path, capsys):
    path, _ = sentence_transformers_folder(folder, tmp_path, {"pooling_mode_mean_tokens": True}, True)
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(TEXTS[1:]) + "\n\n")
    expected = Encoder(path).encode(TEXTS)
    assert main(["embed", TEXTS[0], "--file", str(data), "-m", str(path), "-o", str(tmp_path / "e.npy"),
                 "-b", "2"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), expected, atol=1e-6)
    assert main(["embed", *TEXTS, "-m", str(path), "-o", str(tmp_path / "e.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == TEXTS
    np.testing.assert_allclose(np.array([r["embedding"] for r in rows]), expected, atol=1e-6)
    capsys.readouterr()
    assert main(["embed", "a dog", "-m", str(path), "--no-normalize"]) == 0
    vec = np.array(json.loads(capsys.readouterr().out)["embedding"])
    assert abs(np.linalg.norm(vec) - 1) > 1e-3  # mean pooling without the Normalize module


def test_evaluate_embeddings(folder):
    from miaotui.eval.embeddings import evaluate_embeddings, rankdata

    np.testing.assert_array_equal(rankdata(np.array([3.0, 1.0, 3.0, 2.0])), [3.5, 1, 3.5, 2])
    enc = Encoder(folder("bert")[0])
    same = evaluate_embeddings(enc, enc, TEXTS)
    assert same["mean_cosine"] == pytest.approx(1, abs=1e-6) and same["similarity_spearman"] == pytest.approx(1)
    ref = enc.encode(TEXTS)
    noisy = ref + np.random.default_rng(0).normal(0, 0.5, ref.shape).astype(np.float32)
    worse = evaluate_embeddings(noisy, ref, TEXTS)
    assert worse["min_cosine"] <= worse["mean_cosine"] < 0.999 and worse["similarity_spearman"] < 1


def test_cli_eval_dispatches_encoders(folder, tmp_path, capsys):
    """`miaotui eval` on an encoder folder compares embeddings, numbers equal to the library call's."""
    from miaotui.eval.embeddings import evaluate_embeddings

    path = folder("bert")[0]
    other = path
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(t + " and more words here" for t in TEXTS) + "\n")
    capsys.readouterr()
    assert main(["eval", "-m", str(path), "--reference", str(other), "--data", str(data), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    texts = [t + " and more words here" for t in TEXTS]
    want = evaluate_embeddings(Encoder(path), Encoder(other), texts)
    assert out["texts"] == len(texts) and out["mean_cosine"] == pytest.approx(want["mean_cosine"])
    assert main(["eval", "-m", str(path), "--data", str(data)]) == 1  # an encoder needs --reference


@pytest.mark.slow
def test_minilm_matches_transformers():
    """all-MiniLM-L6-v2 on the WikiText paragraphs: sentence-transformers' mean + normalise, by hand."""
    from transformers import AutoModel

    from miaotui.bench.prompts import default_data_file

    data = default_data_file()
    if data is None:
        pytest.skip("the WikiText excerpt (shared/data) was not found; set MIAOTUI_DATA_DIR")
    texts = [t for t in data.read_text().splitlines() if t.strip()][:48]
    enc = Encoder()
    assert enc.loaded.pooling.modes == ("mean",) and enc.loaded.pooling.normalize and enc.max_tokens == 256
    ref = AutoModel.from_pretrained(str(enc.loaded.path)).eval()
    batch = enc.tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        expected = torch.nn.functional.normalize(st_pool(ref(**batch).last_hidden_state,
                                                         batch["attention_mask"], "mean"), dim=-1)
    with pytest.warns(TruncationWarning):
        got = enc.encode(texts)
    cos = (torch.from_numpy(got) * expected).sum(-1)
    assert cos.min() > 0.99999


def test_prune_heads_equals_zeroing_them(folder):
    """Removing a head is the same as zeroing its value rows (its output is then 0), for fused and
    unfused q/k/v."""
    from miaotui.encoder.prune import head_importance, least_important_heads, prune_heads

    path, _ = folder("bert")
    pruned, ref = Encoder(path), Encoder(path)
    cut = {0: [1], 1: [0, 3]}
    for li, hs in cut.items():
        v = ref.model.layers[li].attention.qkv
        for h in hs:
            rows = slice(2 * 32 + h * 8, 2 * 32 + (h + 1) * 8)  # the value block of the fused weight
            v.weight[rows] = 0
            v.bias[rows] = 0
    prune_heads(pruned.model, cut)
    assert pruned.model.layers[1].attention.qkv.out_features == 3 * 2 * 8
    np.testing.assert_allclose(pruned.encode(TEXTS), ref.encode(TEXTS), atol=1e-5)
    unfused = load_encoder(path)  # unfused q/k/v take the same path
    prune_heads(unfused.model, cut)
    np.testing.assert_allclose(Encoder(unfused).encode(TEXTS), ref.encode(TEXTS), atol=1e-5)
    imp = head_importance(Encoder(path), TEXTS)
    assert imp.shape == (2, 4) and (imp > 0).all()
    drop = least_important_heads(imp, 0.5)
    assert sum(map(len, drop.values())) == 4 and all(len(h) < 4 for h in drop.values())


def test_drop_layers_equals_transformers_without_them(folder):
    from miaotui.encoder.prune import drop_layers, evenly_spaced

    assert evenly_spaced(6, 3) == [0, 2, 5] and evenly_spaced(12, 6) == [0, 2, 4, 7, 9, 11]
    path, ref = folder("bert")
    enc = Encoder(path)
    drop_layers(enc.model, [1])
    full = ref.encoder.layer
    ref.encoder.layer = torch.nn.ModuleList([full[1]])
    try:
        batch = enc.tokenizer(TEXTS, padding=True, return_tensors="pt")
        with torch.no_grad():
            expected = ref(**batch).last_hidden_state[batch["attention_mask"].bool()]
            got, _ = enc.model.forward_padded(batch["input_ids"], batch["attention_mask"])
    finally:
        ref.encoder.layer = full
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_prepared_encoder_takes_native_kernels_for_few_rows(folder, native_preferred):
    """A single short text is a few rows per linear: they go to the native GEMV/GEMM (as measured when the
    encoder is prepared), with the embeddings of PyTorch's own linears."""
    from miaotui import kernels
    from miaotui.kernels.linear import GemvLinear

    if not kernels.available():
        pytest.skip("native kernels do not build on this machine")
    path, _ = folder("bert")
    enc = Encoder(path)
    linears = [m for m in enc.model.modules() if isinstance(m, GemvLinear)]
    assert linears and all(m.gemv_rows >= 4 for m in linears)
    texts = ["a short sentence", "another one, a little longer than the first sentence was"]
    native = torch.as_tensor(enc.encode(texts))
    for m in linears:
        m.gemv_rows = m.gemm_rows = m.onednn_rows = 0  # every row count to nn.Linear's forward
    torch.testing.assert_close(native, torch.as_tensor(enc.encode(texts)), atol=1e-5, rtol=1e-5)


def test_bf16_encoder_attends_with_the_native_kernel_and_agrees_with_fp32(folder):
    """bf16 activations are widened for the fp32 varlen attention kernel (faster than SDPA's bf16 one on a
    CPU with bf16 instructions); the embeddings stay those of fp32 up to bf16 rounding."""
    from miaotui import kernels

    if not kernels.available():
        pytest.skip("native kernels do not build on this machine")
    path, _ = folder("bert")
    bf16 = Encoder(path, dtype="bf16")
    assert all(layer.attention.native for layer in bf16.model.layers)
    texts = TEXTS * 3
    got = torch.as_tensor(bf16.encode(texts)).double()
    ref = torch.as_tensor(Encoder(path).encode(texts)).double()
    assert torch.nn.functional.cosine_similarity(got, ref).min() > 0.999
