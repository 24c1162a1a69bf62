"""Texts in, embeddings out: the file formats the encoder commands read and write."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from miaotui.errors import MiaotuiError


def read_texts(path: str | Path) -> list[str]:
    """One text per non-blank line; ``.jsonl``: one JSON object per line with a "text" field (or a string)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MiaotuiError(f"{path}: cannot read texts ({e})") from None
    if path.suffix != ".jsonl":
        return [line for line in lines if line.strip()]
    texts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise MiaotuiError(f"{path}:{n}: not valid JSON ({e})") from None
        text = obj.get("text") if isinstance(obj, dict) else obj
        if not isinstance(text, str):
            raise MiaotuiError(f"{path}:{n}: expected a string or an object with a \"text\" string")
        texts.append(text)
    return texts


def write_embeddings(path: str | Path, emb: np.ndarray, texts: list[str]) -> None:
    """``.npy``: the (B, D) float32 array; ``.jsonl``: {"index", "text", "embedding"} per line."""
    path = Path(path)
    if path.suffix == ".npy":
        np.save(path, emb.astype(np.float32))
    elif path.suffix == ".jsonl":
        with path.open("w", encoding="utf-8") as fh:
            for i, (text, vec) in enumerate(zip(texts, emb)):
                fh.write(json.dumps({"index": i, "text": text, "embedding": vec.tolist()}, ensure_ascii=False) + "\n")
    else:
        raise MiaotuiError(f"{path}: unknown output format (use .npy or .jsonl)")
