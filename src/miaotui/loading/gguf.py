"""Read a llama.cpp GGUF file as a Hugging Face ``config.json`` dict plus a state dict with HF names.

    config, state_dict = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    config["model_type"]                        # "llama"
    state_dict["model.layers.0.self_attn.q_proj.weight"].shape   # (576, 576), HF (out, in)

Every quantized tensor is dequantized (``gguf.quants.dequantize``) one row chunk at a time straight
into a tensor of the requested dtype, so peak memory is the result plus one chunk. Tensor names come
from gguf's own tables (``gguf.get_tensor_name_map``): each architecture lists only its HF module
names, and gguf says what llama.cpp calls them.

The header is walked here with ``struct`` rather than with ``gguf.GGUFReader``: the reader builds
numpy views per tokenizer string and takes 3.1 s to open SmolLM2 (49k tokens + 49k merges) and 13.6 s
for Gemma 3's 262k vocabulary, where this takes 0.07 s and 0.2 s; it also lets every failure name
its cause (truncation is checked against every tensor's end before any data is read).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import mmap
import os
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from miaotui.errors import ModelLoadError

_T = gguf.GGMLQuantizationType
_V = gguf.GGUFValueType

# (struct format, width) of the fixed-size metadata value types
_SCALAR = {
    _V.UINT8: ("<B", 1), _V.INT8: ("<b", 1), _V.BOOL: ("<?", 1),
    _V.UINT16: ("<H", 2), _V.INT16: ("<h", 2),
    _V.UINT32: ("<I", 4), _V.INT32: ("<i", 4), _V.FLOAT32: ("<f", 4),
    _V.UINT64: ("<Q", 8), _V.INT64: ("<q", 8), _V.FLOAT64: ("<d", 8),
}  # fmt: skip
_SUPPORTED_VERSIONS = (2, 3)  # v1 counted in 32 bits; llama.cpp has written v3 since 2023
_MAX_DIMS = 4  # GGML_MAX_DIMS
_LONG_STRING_ARRAY = 64  # string arrays longer than this (vocabularies, merges) are skipped, not decoded

# Float types copied with torch (numpy has no bfloat16: its raw 16-bit words are reinterpreted);
# everything else goes through gguf.quants.dequantize.
_PLAIN_DTYPES = {
    _T.F32: (np.float32, torch.float32),
    _T.F16: (np.float16, torch.float16),
    _T.BF16: (np.int16, torch.bfloat16),
    _T.F64: (np.float64, torch.float64),
}
_DEQUANT_CHUNK_ELEMS = 1 << 22  # 16 MiB of float32 per dequantize call


# ---------------------------------------------------------------- header


@dataclass(frozen=True)
class _TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: GGUF stores ne0 (the fastest-moving dim) first
    ggml_type: int
    offset: int  # absolute, from the start of the file
    nbytes: int


@dataclass(frozen=True)
class _Header:
    path: Path
    version: int
    metadata: dict[str, Any]  # long string arrays are kept as their length (an int)
    tensors: dict[str, _TensorInfo]
    file_size: int

    @property
    def arch(self) -> str:
        return self.metadata["general.architecture"]


class _Truncated(Exception):
    """The header asks for bytes past the end of the file."""


class _Cursor:
    """Reads little-endian GGUF header values from a buffer, refusing to run past its end."""

    def __init__(self, buf, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def take(self, n: int) -> int:
        start = self.pos
        if n < 0 or start + n > self.size:
            raise _Truncated(start + n)
        self.pos = start + n
        return start

    def unpack(self, fmt: str, width: int):
        return struct.unpack_from(fmt, self.buf, self.take(width))[0]

    def string(self) -> str:
        n = self.unpack("<Q", 8)
        start = self.take(n)
        return bytes(self.buf[start : start + n]).decode("utf-8")

    def skip_string(self) -> None:
        self.take(self.unpack("<Q", 8))

    def value(self, vtype: int) -> Any:
        if vtype in _SCALAR:
            value = self.unpack(*_SCALAR[vtype])
            # float32 metadata back to the short decimal it was written from (9.99999974738e-06 → 1e-05)
            return float(str(np.float32(value))) if vtype == _V.FLOAT32 else value
        if vtype == _V.STRING:
            return self.string()
        if vtype == _V.ARRAY:
            itype, count = self.unpack("<I", 4), self.unpack("<Q", 8)
            if itype in _SCALAR:
                fmt, width = _SCALAR[itype]
                start = self.take(count * width)
                values = np.frombuffer(self.buf, dtype=np.dtype(fmt), count=count, offset=start)
                return values.tolist()
            if itype == _V.STRING and count > _LONG_STRING_ARRAY:
                for _ in range(count):
                    self.skip_string()
                return count
            return [self.value(itype) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {vtype} at byte {self.pos - 4}")


def _open(path: Path) -> tuple[mmap.mmap, int]:
    """Map the file privately (copy-on-write: writable for numpy/torch, never written back)."""
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, expected a .gguf file")
    size = path.stat().st_size
    if size < 8:
        raise ModelLoadError(f"{path}: not a GGUF file (only {size} bytes)")
    try:
        with open(path, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), size
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read the file ({e.strerror or e})") from None


def _parse_header(path: Path, buf, size: int) -> _Header:
    magic = bytes(buf[:4])
    if magic != struct.pack("<I", gguf.GGUF_MAGIC):
        raise ModelLoadError(f"{path}: not a GGUF file (bad magic {magic!r}, expected b'GGUF')")
    cur = _Cursor(buf, size)
    cur.take(4)
    version = cur.unpack("<I", 4)
    if version & 0xFFFF == 0:
        raise ModelLoadError(f"{path}: big-endian GGUF files are not supported")
    if version not in _SUPPORTED_VERSIONS:
        raise ModelLoadError(f"{path}: unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors, n_kv = cur.unpack("<Q", 8), cur.unpack("<Q", 8)
    if n_tensors > size or n_kv > size:  # each needs several bytes: the counts are garbage
        raise ModelLoadError(f"{path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} keys in {size:,} bytes)")

    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.unpack("<I", 4))

    entries = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.unpack("<I", 4)
        if not 1 <= n_dims <= _MAX_DIMS:
            raise ModelLoadError(f"{path}: corrupt GGUF header (tensor '{name}' has {n_dims} dimensions)")
        ne = [cur.unpack("<Q", 8) for _ in range(n_dims)]
        entries.append((name, tuple(reversed(ne)), cur.unpack("<I", 4), cur.unpack("<Q", 8)))

    alignment = metadata.get(gguf.Keys.General.ALIGNMENT, gguf.GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ModelLoadError(f"{path}: corrupt GGUF header (alignment {alignment!r} is not a power of two)")
    data_start = -(-cur.pos // alignment) * alignment

    tensors: dict[str, _TensorInfo] = {}
    for name, shape, ggml_type, offset in entries:
        try:
            qtype = _T(ggml_type)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise ModelLoadError(
                f"{path}: unsupported tensor type id {ggml_type} in tensor '{name}' (newer than gguf {_gguf_version()})"
            ) from None
        if shape[-1] % block:
            raise ModelLoadError(
                f"{path}: corrupt tensor '{name}' "
                f"(row of {shape[-1]} is not a multiple of {qtype.name}'s block of {block})"
            )
        nbytes = math.prod(shape) // block * type_size
        tensors[name] = _TensorInfo(name, shape, ggml_type, data_start + offset, nbytes)

    end = max((t.offset + t.nbytes for t in tensors.values()), default=data_start)
    if end > size:
        raise ModelLoadError(f"{path}: truncated file (expected {end:,} bytes, found {size:,})")
    if "general.architecture" not in metadata:
        raise ModelLoadError(f"{path}: GGUF metadata has no general.architecture")
    return _Header(path, version, metadata, tensors, size)


def _read_header(path: str | os.PathLike) -> tuple[_Header, mmap.mmap]:
    path = Path(path)
    buf, size = _open(path)
    try:
        return _parse_header(path, buf, size), buf
    except _Truncated as e:
        needed = e.args[0]
        raise ModelLoadError(f"{path}: truncated file (header needs at least {needed:,} bytes, found {size:,})") from None
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise ModelLoadError(f"{path}: corrupt GGUF header ({e})") from None


def _gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")


# ---------------------------------------------------------------- tensors


@functools.cache
def _can_dequantize(ggml_type: int) -> bool:
    if ggml_type in _PLAIN_DTYPES:
        return True
    qtype = _T(ggml_type)
    try:  # ask gguf itself with one zero block, rather than keeping a list that goes stale
        gguf.quants.dequantize(np.zeros((1, gguf.GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
    except (NotImplementedError, KeyError):
        return False
    return True


def _supported_type_names() -> str:
    return ", ".join(t.name for t in _T if _can_dequantize(t))


def _dequantize(buf, info: _TensorInfo, dtype: torch.dtype) -> torch.Tensor:
    """One tensor, in HF's dim order (``info.shape``), as a fresh ``dtype`` tensor (never a view of the file)."""
    out = torch.empty(info.shape, dtype=dtype)
    if (plain := _PLAIN_DTYPES.get(info.ggml_type)) is not None:
        np_dtype, torch_dtype = plain
        raw = np.frombuffer(buf, dtype=np_dtype, count=math.prod(info.shape), offset=info.offset)
        out.copy_(torch.from_numpy(raw).view(torch_dtype).reshape(info.shape))
        return out
    qtype = _T(info.ggml_type)
    cols = info.shape[-1]
    rows = math.prod(info.shape) // cols
    blocks = np.frombuffer(buf, dtype=np.uint8, count=info.nbytes, offset=info.offset).reshape(rows, -1)
    flat = out.view(rows, cols)
    step = max(1, _DEQUANT_CHUNK_ELEMS // cols)
    for r in range(0, rows, step):
        flat[r : r + step].copy_(torch.from_numpy(gguf.quants.dequantize(blocks[r : r + step], qtype)))
    return out


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


def _arch_of(header: _Header) -> _Arch:
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
        assert gguf_name is not None, f"gguf {_gguf_version()} has no name for {module}"
        names[gguf_name] = module
    return names


def _is_tied(header: _Header, buf) -> bool:
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
    def __init__(self, header: _Header):
        self.header, self.prefix = header, header.arch + "."

    def get(self, key: str, default: Any = None) -> Any:
        return self.header.metadata.get(self.prefix + key, default)

    def need(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ModelLoadError(f"{self.header.path}: GGUF metadata lacks '{self.prefix + key}'")
        return value


def _vocab_size(header: _Header, meta: _Meta) -> int:
    # the embedding's rows are what the model is built with; the token list may be shorter
    if (size := meta.get("vocab_size")) is not None:
        return size
    if (emb := header.tensors.get(_EMBED)) is not None:
        return emb.shape[0]
    tokens = header.metadata.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ModelLoadError(f"{header.path}: cannot tell the vocabulary size (no vocab_size, embedding or tokens)")
    return tokens if isinstance(tokens, int) else len(tokens)


def _token_ids(header: _Header) -> dict[str, int]:
    keys = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "padding_token_id"}
    md = header.metadata
    return {hf: md[f"tokenizer.ggml.{g}"] for hf, g in keys.items() if f"tokenizer.ggml.{g}" in md}


def _rope_scaling(header: _Header, meta: _Meta, buf, theta: float, head_dim: int) -> dict | None:
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
        factors = _dequantize(buf, info, torch.float64).numpy()
        return _llama3_rope_scaling(header.path, factors, theta, head_dim)
    return None


def _llama3_factors(theta, head_dim, factor, low, high, original) -> np.ndarray:
    # convert_hf_to_gguf.py's LlamaModel rope_freqs: the divisor of each inv_freq
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
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
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
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


def _llama_config(header: _Header, arch: _Arch, buf, tied: bool) -> dict:
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


def _gpt2_config(header: _Header, arch: _Arch, buf, tied: bool) -> dict:
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


def _config(header: _Header, buf) -> dict:
    arch = _arch_of(header)
    build = _gpt2_config if arch.model_type == "gpt2" else _llama_config
    return build(header, arch, buf, _is_tied(header, buf))


# ---------------------------------------------------------------- public API


def read_gguf_config(path: str | os.PathLike) -> dict:
    """The HF ``config.json``-style dict of a GGUF file (metadata only; reads no tensor data but rope_freqs)."""
    header, buf = _read_header(path)
    return _config(header, buf)


def gguf_tensor_types(path: str | os.PathLike) -> dict[str, int]:
    """How many tensors the file holds of each ggml type, e.g. ``{"Q4_1": 210, "F32": 61, "Q8_0": 1}``."""
    header, _ = _read_header(path)
    counts: dict[str, int] = {}
    for info in header.tensors.values():
        name = _T(info.ggml_type).name
        counts[name] = counts.get(name, 0) + 1
    return counts


def load_gguf(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, progress: bool = False
) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config, state_dict)`` with HF parameter names and shapes, every tensor dequantized to ``dtype``.

    ``lm_head.weight`` is present only when the file's output projection is not the embedding.
    """
    header, buf = _read_header(path)
    config = _config(header, buf)
    arch = _arch_of(header)
    tied = config["tie_word_embeddings"]
    n_layers = config.get("num_hidden_layers", config.get("n_layer"))
    names = _hf_names(arch, n_layers)

    plan: list[tuple[_TensorInfo, str]] = []
    unknown = []
    for info in header.tensors.values():
        if info.name == _ROPE_FREQS or (tied and info.name == _OUTPUT):
            continue
        base, _, suffix = info.name.rpartition(".")
        module = names.get(base)
        if module is None or suffix not in ("weight", "bias"):
            unknown.append(info.name)
            continue
        if not _can_dequantize(info.ggml_type):
            raise ModelLoadError(
                f"{header.path}: unsupported tensor type {_T(info.ggml_type).name} in tensor '{info.name}' "
                f"(supported: {_supported_type_names()})"
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
            tensor = _dequantize(buf, info, dtype)
            if arch.permute_qk and ".self_attn.q_proj." in hf_name:
                tensor = _unpermute_qk(tensor, n_head)
            elif arch.permute_qk and ".self_attn.k_proj." in hf_name:
                tensor = _unpermute_qk(tensor, n_kv)
            elif hf_name.endswith(arch.conv1d):
                tensor = tensor.t().contiguous()
            state_dict[hf_name] = tensor
            bar.update(info.nbytes)
    return config, state_dict


# ---------------------------------------------------------------- tokenizer

_TOKENIZER_CACHE_VERSION = 1  # bump when what we store changes


def _cache_root() -> Path:
    if root := os.environ.get("MIAOTUI_CACHE"):
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "miaotui"


def _tokenizer_cache_key(path: Path) -> str:
    import transformers

    st = path.stat()
    ident = f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\0{transformers.__version__}\0{_TOKENIZER_CACHE_VERSION}"
    return f"{path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def _tokenizer_fingerprint(tok) -> tuple:
    probe = "Hello, world! <|im_start|>user\n  héllo 123</s>"
    return (len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.chat_template, tok.encode(probe))


def load_gguf_tokenizer(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
    """The file's tokenizer as a transformers tokenizer, converted once and then loaded from a cache.

    transformers converts a GGUF vocabulary in ~7 s (the BPE merges); the result is saved under
    ``cache_dir`` (default ``$MIAOTUI_CACHE/tokenizers`` or ``~/.cache/miaotui/tokenizers``) keyed by
    the file's name, size and mtime and the transformers version, and loads from there in well under 1 s.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    header, _ = _read_header(path)  # a clear error for a missing or broken file
    root = Path(cache_dir) if cache_dir is not None else _cache_root() / "tokenizers"
    target = root / _tokenizer_cache_key(path)
    if target.is_dir():
        try:
            return AutoTokenizer.from_pretrained(str(target))
        except (OSError, ValueError):  # a damaged entry: convert again and replace it
            shutil.rmtree(target, ignore_errors=True)

    if "tokenizer.ggml.model" not in header.metadata:
        raise ModelLoadError(f"{path}: the GGUF file has no tokenizer metadata")
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, TypeError, NotImplementedError, OSError) as e:
        raise ModelLoadError(f"{path}: cannot build a tokenizer from the GGUF metadata ({e})") from e
    if tok.chat_template is None and isinstance(header.metadata.get("tokenizer.chat_template"), str):
        tok.chat_template = header.metadata["tokenizer.chat_template"]
    _save_tokenizer(tok, target)
    return tok


def _save_tokenizer(tok, target: Path) -> None:
    """Save to a temporary folder, check it loads back the same, then rename it into place (atomic)."""
    from transformers import AutoTokenizer

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    except OSError:
        return  # a read-only cache only costs speed
    try:
        tok.save_pretrained(str(tmp))
        if _tokenizer_fingerprint(AutoTokenizer.from_pretrained(str(tmp))) == _tokenizer_fingerprint(tok):
            os.replace(tmp, target)
        else:
            logging.getLogger(__name__).warning("%s: the saved tokenizer loads back differently; not cached", target)
    except OSError:
        pass  # another process won the rename, or the disk is full: the converted tokenizer still works
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
