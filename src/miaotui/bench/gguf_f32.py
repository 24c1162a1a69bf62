"""An F32 copy of a GGUF file (same metadata, tokenizer and tensor names; every tensor dequantized), so
llama.cpp can be compared with miaotui's fp32 engine on exactly the weights miaotui loads from the file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def f32_gguf(src: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the F32 copy of ``src``, written once (with the ``gguf`` package) and cached beside the
    converted tokenizers in ``~/.cache/miaotui/gguf-f32``; keyed by the source's name, size and mtime."""
    import gguf

    src = Path(src)
    stat = src.stat()
    cache = Path(cache_dir or Path.home() / ".cache" / "miaotui" / "gguf-f32")
    dst = cache / f"{src.stem}.{stat.st_size}-{int(stat.st_mtime)}.F32.gguf"
    if dst.is_file():
        return dst
    cache.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    tmp = dst.with_suffix(".partial")
    writer = gguf.GGUFWriter(str(tmp), arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = int(gguf.LlamaFileType.ALL_F32) if field.name == gguf.Keys.General.FILE_TYPE else field.contents()
        writer.add_key_value(field.name, value, vtype, sub_type=sub)
    for t in reader.tensors:
        data = np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        writer.add_tensor(t.name, data, raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(dst)  # a half-written file never looks finished
    return dst
