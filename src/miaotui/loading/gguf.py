"""Read a llama.cpp GGUF file as a Hugging Face ``config.json`` dict plus a state dict with HF names.

    config, state_dict = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    config["model_type"]                        # "llama"
    state_dict["model.layers.0.self_attn.q_proj.weight"].shape   # (576, 576), HF (out, in)

Tensor names come from gguf's own tables (``gguf.get_tensor_name_map``): each architecture lists only
its HF module names, and gguf says what llama.cpp calls them. The file itself (header, dequantization)
is read by ``miaotui.loading.gguf_file``; its tokenizer by ``miaotui.loading.gguf_tokenizer``.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from miaotui.errors import ModelLoadError
from miaotui.loading.gguf_file import (
    Header,
    TensorInfo,
    can_dequantize,
    dequantize,
    gguf_version,
    read_header,
    supported_type_names,
    type_name,
)


# ---------------------------------------------------------------- Q/K layout


def _unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's ``LlamaModel.permute`` of Q/K rows, back to HF's rotate-half layout.

    Per head, llama.cpp interleaves the two rotary halves: rows [a0, b0, a1, b1, ...]; HF keeps
    [a0, a1, ..., b0, b1, ...]. Works on a weight (out, in) and on a bias (out,).
    """
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ---------------------------------------------------------------- architectures


@dataclass(frozen=True)
class _Arch:
    gguf_arch: gguf.MODEL_ARCH
    model_type: str
    hf_class: str
    globals: tuple[str, ...]  # HF module names outside the blocks
    layer: tuple[str, ...]  # HF module names of block {bid}
    permute_qk: bool = False  # llama.cpp's converter interleaves Q/K rows for this architecture
    conv1d: tuple[str, ...] = ()  # HF Conv1D modules: (in, out) in HF, transposed in the GGUF


_LLAMA_LAYER = tuple(
    f"model.layers.{{bid}}.{m}"
    for m in (
        "input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    )
)  # fmt: skip
_LLAMA_GLOBALS = ("model.embed_tokens", "model.norm", "lm_head")

_ARCHS = {
    # Mistral (7B, Nemo, Small) is written by llama.cpp as "llama": the same graph, so the same loader.
    "llama": _Arch(gguf.MODEL_ARCH.LLAMA, "llama", "LlamaForCausalLM", _LLAMA_GLOBALS, _LLAMA_LAYER, permute_qk=True),
    "qwen2": _Arch(gguf.MODEL_ARCH.QWEN2, "qwen2", "Qwen2ForCausalLM", _LLAMA_GLOBALS, _LLAMA_LAYER),
    "gpt2": _Arch(
        gguf.MODEL_ARCH.GPT2,
        "gpt2",
        "GPT2LMHeadModel",
        ("transformer.wte", "transformer.wpe", "transformer.ln_f", "lm_head"),
        tuple(
            f"transformer.h.{{bid}}.{m}"
            for m in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
        ),
        conv1d=("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"),
    ),
}
_SUPPORTED = "llama (also Mistral), qwen2, gpt2"
_ROPE_FREQS = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"  # llama 3 rope scaling, not a weight
_EMBED, _OUTPUT = "token_embd.weight", "output.weight"


def _arch_of(header: Header) -> _Arch:
    arch = _ARCHS.get(header.arch)
    if arch is None:
        raise ModelLoadError(f"{header.path}: unsupported GGUF architecture '{header.arch}' (supported: {_SUPPORTED})")
    return arch


def _hf_names(arch: _Arch, n_layers: int) -> dict[str, str]:
    """GGUF tensor base name → HF module name, e.g. ``blk.0.attn_q`` → ``model.layers.0.self_attn.q_proj``."""
    table = gguf.get_tensor_name_map(arch.gguf_arch, n_layers)
    hf = list(arch.globals) + [m.format(bid=b) for b in range(n_layers) for m in arch.layer]
    names = {}
    for module in hf:
        gguf_name = table.get_name(module)
        assert gguf_name is not None, f"gguf {gguf_version()} has no name for {module}"
        names[gguf_name] = module
    return names


def _is_tied(header: Header, buf) -> bool:
    """llama.cpp omits output.weight for tied embeddings, except gpt2, which it writes as a copy."""
    out, emb = header.tensors.get(_OUTPUT), header.tensors.get(_EMBED)
    if out is None:
        return True
    if emb is None or (out.shape, out.ggml_type, out.nbytes) != (emb.shape, emb.ggml_type, emb.nbytes):
        return False
    view, step = memoryview(buf), 1 << 24
    for i in range(0, out.nbytes, step):  # compared in place, in chunks: no copy of either matrix
        n = min(step, out.nbytes - i)
        if view[out.offset + i : out.offset + i + n] != view[emb.offset + i : emb.offset + i + n]:
            return False
    return True


# ---------------------------------------------------------------- config


class _Meta:
    def __init__(self, header: Header):
        self.header, self.prefix = header, header.arch + "."

    def get(self, key: str, default: Any = None) -> Any:
        return self.header.metadata.get(self.prefix + key, default)

    def need(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ModelLoadError(f"{self.header.path}: GGUF metadata lacks '{self.prefix + key}'")
        return value


def _vocab_size(header: Header, meta: _Meta) -> int:
    # the embedding's rows are what the model is built with; the token list may be shorter
    if (size := meta.get("vocab_size")) is not None:
        return size
    if (emb := header.tensors.get(_EMBED)) is not None:
        return emb.shape[0]
    tokens = header.metadata.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ModelLoadError(f"{header.path}: cannot tell the vocabulary size (no vocab_size, embedding or tokens)")
    return tokens if isinstance(tokens, int) else len(tokens)


def _token_ids(header: Header) -> dict[str, int]:
    keys = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "padding_token_id"}
    md = header.metadata
    return {hf: md[f"tokenizer.ggml.{g}"] for hf, g in keys.items() if f"tokenizer.ggml.{g}" in md}


def _rope_scaling(header: Header, meta: _Meta, buf, theta: float, head_dim: int) -> dict | None:
    kind = meta.get("rope.scaling.type")
    factor = meta.get("rope.scaling.factor")
    if kind is None and meta.get("rope.scale_linear") is not None:  # the key before rope.scaling.type
        kind, factor = "linear", meta.get("rope.scale_linear")
    if kind not in (None, "none"):
        scaling = {"rope_type": kind, "factor": factor}
        extra = {
            "original_max_position_embeddings": "rope.scaling.original_context_length",
            "attention_factor": "rope.scaling.attn_factor",
            "beta_fast": "rope.scaling.yarn_beta_fast",
            "beta_slow": "rope.scaling.yarn_beta_slow",
        }
        scaling.update({hf: meta.get(k) for hf, k in extra.items() if meta.get(k) is not None})
        return scaling
    if (info := header.tensors.get(_ROPE_FREQS)) is not None:
        factors = dequantize(buf, info, torch.float64).numpy()
        return _llama3_rope_scaling(header.path, factors, theta, head_dim)
    return None


def _inv_freq(theta: float, head_dim: int) -> np.ndarray:
    return 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def _llama3_factors(theta, head_dim, factor, low, high, original) -> np.ndarray:
    # convert_hf_to_gguf.py's LlamaModel rope_freqs: the divisor of each inv_freq
    wavelen = 2 * math.pi / _inv_freq(theta, head_dim)
    smooth = (original / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, mid))


def _llama3_rope_scaling(path: Path, factors: np.ndarray, theta: float, head_dim: int) -> dict | None:
    """Recover HF's ``rope_type: llama3`` parameters from the ``rope_freqs`` tensor llama.cpp writes instead.

    The middle band is ``1/r = (1-s)/factor + s`` with ``s = A·inv_freq + B`` linear; its ends (s=0, s=1)
    are the band's edges, so (A, B) fix the schedule and ``low_freq_factor = 1`` (every Llama 3) pins
    ``high_freq_factor = 1 - 1/B`` and ``original_max_position_embeddings = -2πA/B``.
    """
    factor = float(factors.max())
    if factor <= 1.0:
        return None
    low, high, original = 1.0, 4.0, 8192  # Llama 3.1 / 3.2, used when the band has < 2 points
    inv_freq = _inv_freq(theta, head_dim)
    mid = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    if mid.sum() >= 2:
        s = (1 / factors[mid] - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(inv_freq[mid], s, 1)
        if b < 0:
            high, original = round(float(1 - 1 / b), 4), int(round(float(-2 * math.pi * a / b)))
    expected = _llama3_factors(theta, head_dim, factor, low, high, original)
    if factors.shape != expected.shape or not np.allclose(factors, expected, rtol=1e-3):
        raise ModelLoadError(f"{path}: rope_freqs tensor does not follow a llama3 rope schedule")
    return {
        "rope_type": "llama3",
        "factor": float(str(np.float32(factor))),
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original,
    }


def _llama_config(header: Header, arch: _Arch, buf, tied: bool) -> dict:
    meta = _Meta(header)
    hidden, n_head = meta.need("embedding_length"), meta.need("attention.head_count")
    n_kv = meta.get("attention.head_count_kv", n_head)
    if isinstance(n_kv, list):  # per-layer counts: fine only when they agree
        if len(set(n_kv)) != 1:
            raise ModelLoadError(f"{header.path}: per-layer KV head counts {sorted(set(n_kv))} are not supported")
        n_kv = n_kv[0]
    head_dim = meta.get("attention.key_length", hidden // n_head)
    rope_dim = meta.get("rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise ModelLoadError(
            f"{header.path}: partial rotary embeddings ({rope_dim} of {head_dim} dims) are not supported"
        )
    theta = meta.get("rope.freq_base", 10000.0)
    config = {
        "model_type": arch.model_type,
        "architectures": [arch.hf_class],
        "vocab_size": _vocab_size(header, meta),
        "hidden_size": hidden,
        "intermediate_size": meta.need("feed_forward_length"),
        "num_hidden_layers": meta.need("block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "max_position_embeddings": meta.need("context_length"),
        "rms_norm_eps": meta.get("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": theta,
        "attention_bias": "blk.0.attn_q.bias" in header.tensors,
        "tie_word_embeddings": tied,
        **_token_ids(header),
    }
    if arch.model_type == "llama":
        config["mlp_bias"] = "blk.0.ffn_up.bias" in header.tensors
    if (scaling := _rope_scaling(header, meta, buf, theta, head_dim)) is not None:
        config["rope_scaling"] = scaling
    return config


def _gpt2_config(header: Header, arch: _Arch, buf, tied: bool) -> dict:
    meta = _Meta(header)
    return {
        "model_type": arch.model_type,
        "architectures": [arch.hf_class],
        "vocab_size": _vocab_size(header, meta),
        "n_embd": meta.need("embedding_length"),
        "n_layer": meta.need("block_count"),
        "n_head": meta.need("attention.head_count"),
        "n_positions": meta.need("context_length"),
        "n_inner": meta.need("feed_forward_length"),
        "layer_norm_epsilon": meta.get("attention.layer_norm_epsilon", 1e-5),
        "tie_word_embeddings": tied,
        **_token_ids(header),
    }


def _config(header: Header, buf) -> dict:
    arch = _arch_of(header)
    build = _gpt2_config if arch.model_type == "gpt2" else _llama_config
    return build(header, arch, buf, _is_tied(header, buf))


# ---------------------------------------------------------------- public API


def read_gguf_config(path: str | os.PathLike) -> dict:
    """The HF ``config.json``-style dict of a GGUF file (metadata only; reads no tensor data but rope_freqs)."""
    header, buf = read_header(path)
    return _config(header, buf)


def gguf_tensor_types(path: str | os.PathLike) -> dict[str, int]:
    """How many tensors the file holds of each ggml type, e.g. ``{"Q4_1": 210, "F32": 61, "Q8_0": 1}``."""
    header, _ = read_header(path)
    counts: dict[str, int] = {}
    for info in header.tensors.values():
        name = type_name(info.ggml_type)
        counts[name] = counts.get(name, 0) + 1
    return counts


def load_gguf(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, progress: bool = False
) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config, state_dict)`` with HF parameter names and shapes, every tensor dequantized to ``dtype``.

    ``lm_head.weight`` is present only when the file's output projection is not the embedding.
    """
    header, buf = read_header(path)
    config = _config(header, buf)
    arch = _arch_of(header)
    tied = config["tie_word_embeddings"]
    n_layers = config.get("num_hidden_layers", config.get("n_layer"))
    names = _hf_names(arch, n_layers)

    plan: list[tuple[TensorInfo, str]] = []
    unknown = []
    for info in header.tensors.values():
        if info.name == _ROPE_FREQS or (tied and info.name == _OUTPUT):
            continue
        base, _, suffix = info.name.rpartition(".")
        module = names.get(base)
        if module is None or suffix not in ("weight", "bias"):
            unknown.append(info.name)
            continue
        if not can_dequantize(info.ggml_type):
            raise ModelLoadError(
                f"{header.path}: unsupported tensor type {type_name(info.ggml_type)} in tensor '{info.name}' "
                f"(supported: {supported_type_names()})"
            )
        plan.append((info, f"{module}.{suffix}"))
    if unknown:
        raise ModelLoadError(f"{header.path}: unexpected tensors for '{header.arch}': {', '.join(unknown[:5])}")
    have = {hf for _, hf in plan}
    required = [f"{m}.weight" for m in names.values() if m != "lm_head" or not tied]
    if missing := [n for n in required if n not in have]:
        raise ModelLoadError(f"{header.path}: missing tensors {', '.join(missing[:5])}")

    from tqdm import tqdm

    n_head = config.get("num_attention_heads")
    n_kv = config.get("num_key_value_heads")
    state_dict: dict[str, torch.Tensor] = {}
    bar = tqdm(
        total=sum(info.nbytes for info, _ in plan),
        unit="B",
        unit_scale=True,
        desc=f"Loading {header.path.name}",
        file=sys.stderr,
        disable=not progress,
    )
    with bar:
        for info, hf_name in plan:
            tensor = dequantize(buf, info, dtype)
            if arch.permute_qk and ".self_attn.q_proj." in hf_name:
                tensor = _unpermute_qk(tensor, n_head)
            elif arch.permute_qk and ".self_attn.k_proj." in hf_name:
                tensor = _unpermute_qk(tensor, n_kv)
            elif hf_name.endswith(arch.conv1d):
                tensor = tensor.t().contiguous()
            state_dict[hf_name] = tensor
            bar.update(info.nbytes)
    return config, state_dict

