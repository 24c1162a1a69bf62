"""The GGUF container: a fast header reader and per-tensor dequantization.

    header, buf = read_header("SmolLM2-135M-Instruct.Q4_1.gguf")
    header.arch                                  # "llama"
    info = header.tensors["blk.0.attn_q.weight"]
    dequantize(buf, info, torch.float32).shape   # (576, 576), torch order

The header is walked here with ``struct`` rather than with ``gguf.GGUFReader``: the reader builds
numpy views per tokenizer string and takes 3.1 s to open SmolLM2 (49k tokens + 49k merges) and 13.6 s
for Gemma 3's 262k vocabulary, where this takes 0.07 s and 0.2 s; it also lets every failure name
its cause (truncation is checked against every tensor's end before any data is read).

Every quantized tensor is dequantized (``gguf.quants.dequantize``) one row chunk at a time straight
into a tensor of the requested dtype, so peak memory is the result plus one chunk.
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import struct
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


def gguf_version() -> str:
    """The installed gguf-py's version, for error messages."""
    from importlib.metadata import version

    return version("gguf")


# ---------------------------------------------------------------- header


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: GGUF stores ne0 (the fastest-moving dim) first
    ggml_type: int
    offset: int  # absolute, from the start of the file
    nbytes: int


@dataclass(frozen=True)
class Header:
    path: Path
    metadata: dict[str, Any]  # long string arrays are kept as their length (an int)
    tensors: dict[str, TensorInfo]

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


def _parse_header(path: Path, buf, size: int) -> Header:
    magic = bytes(buf[:4])
    if magic != struct.pack("<I", gguf.GGUF_MAGIC):
        raise ModelLoadError(f"{path}: not a GGUF file (bad magic {magic!r}, expected b'GGUF')")
    cur = _Cursor(buf, size)
    cur.take(4)
    version = cur.unpack("<I", 4)
    if version & 0xFFFF == 0:
        raise ModelLoadError(f"{path}: big-endian GGUF files are not supported")
    if version not in _SUPPORTED_VERSIONS:
        supported = ", ".join(map(str, _SUPPORTED_VERSIONS))
        raise ModelLoadError(f"{path}: unsupported GGUF version {version} (supported: {supported})")
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

    tensors: dict[str, TensorInfo] = {}
    for name, shape, ggml_type, offset in entries:
        try:
            qtype = _T(ggml_type)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise ModelLoadError(
                f"{path}: unsupported tensor type id {ggml_type} in tensor '{name}' (newer than gguf {gguf_version()})"
            ) from None
        if shape[-1] % block:
            raise ModelLoadError(
                f"{path}: corrupt tensor '{name}' "
                f"(row of {shape[-1]} is not a multiple of {qtype.name}'s block of {block})"
            )
        nbytes = math.prod(shape) // block * type_size
        tensors[name] = TensorInfo(name, shape, ggml_type, data_start + offset, nbytes)

    end = max((t.offset + t.nbytes for t in tensors.values()), default=data_start)
    if end > size:
        raise ModelLoadError(f"{path}: truncated file (expected {end:,} bytes, found {size:,})")
    if "general.architecture" not in metadata:
        raise ModelLoadError(f"{path}: GGUF metadata has no general.architecture")
    return Header(path, metadata, tensors)


def read_header(path: str | os.PathLike) -> tuple[Header, mmap.mmap]:
    """The file's parsed header and a private memory map of the whole file (for ``dequantize``)."""
    path = Path(path)
    buf, size = _open(path)
    try:
        return _parse_header(path, buf, size), buf
    except _Truncated as e:
        needed = e.args[0]
        raise ModelLoadError(f"{path}: truncated file (header needs at least {needed:,} bytes, found {size:,})") from None
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise ModelLoadError(f"{path}: corrupt GGUF header ({e})") from None


# ---------------------------------------------------------------- tensors


def type_name(ggml_type: int) -> str:
    """The ggml type's name, e.g. ``"Q4_1"``."""
    return _T(ggml_type).name


@functools.cache
def can_dequantize(ggml_type: int) -> bool:
    if ggml_type in _PLAIN_DTYPES:
        return True
    qtype = _T(ggml_type)
    try:  # ask gguf itself with one zero block, rather than keeping a list that goes stale
        gguf.quants.dequantize(np.zeros((1, gguf.GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
    except (NotImplementedError, KeyError):
        return False
    return True


def supported_type_names() -> str:
    return ", ".join(t.name for t in _T if can_dequantize(t))


def dequantize(buf, info: TensorInfo, dtype: torch.dtype) -> torch.Tensor:
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
