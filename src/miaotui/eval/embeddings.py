"""Embedding quality of an encoder against a reference encoder (e.g. compressed vs original).

- mean / min cosine of each text's embedding to the reference's: how far single vectors moved;
- Spearman correlation of the two pairwise cosine-similarity matrices (upper triangles): whether the
  *ranking* of neighbours survived, which is what retrieval cares about.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


EVAL_TEXTS = 256  # texts compared by default


def eval_texts(data: str | Path | None = None, limit: int | None = EVAL_TEXTS) -> tuple[list[str], Path]:
    """The lines of ``data`` (default: the WikiText excerpt) worth embedding (four words or more), the first
    ``limit`` of them; and the file's path."""
    from miaotui.encoder.io import read_texts
    from miaotui.errors import MiaotuiError
    from miaotui.eval.data import default_data_path

    path = Path(data).expanduser() if data else default_data_path()
    texts = [t for t in read_texts(path) if len(t.split()) >= 4][:limit]
    if len(texts) < 2:
        raise MiaotuiError(f"{path}: need at least two lines of text (four words or more) to compare embeddings")
    return texts, path


def _embed(model: Any, texts: list[str], batch_size: int) -> np.ndarray:
    """An ``Encoder``, a model path (or None: the default encoder), or precomputed embeddings (B, D)."""
    if isinstance(model, np.ndarray):
        return model.astype(np.float64)
    if hasattr(model, "numpy") and not hasattr(model, "encode"):  # a torch tensor
        return model.detach().float().numpy().astype(np.float64)
    if model is None or isinstance(model, (str, Path)):
        from miaotui.encoder import Encoder

        model = Encoder(model)
    return model.encode(texts, batch_size=batch_size, normalize=False).astype(np.float64)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (what Spearman's rho needs)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = rankdata(np.asarray(a)), rankdata(np.asarray(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def evaluate_embeddings(model: Any, reference: Any, texts: list[str], batch_size: int = 32) -> dict:
    """``model`` and ``reference``: each an ``Encoder``, a model path (None = the default encoder) or
    embeddings already computed for ``texts``. Returns
    ``{"texts", "dim", "mean_cosine", "min_cosine", "similarity_spearman"}``."""
    if len(texts) < 2:
        raise ValueError("need at least two texts (the similarity correlation compares pairs)")
    a, r = _unit(_embed(model, texts, batch_size)), _unit(_embed(reference, texts, batch_size))
    if a.shape != r.shape:
        raise ValueError(f"embedding shapes differ: {a.shape} vs reference {r.shape}")
    cos = (a * r).sum(1)
    iu = np.triu_indices(len(texts), k=1)
    rho = spearman((a @ a.T)[iu], (r @ r.T)[iu])
    return {"texts": len(texts), "dim": a.shape[1], "mean_cosine": float(cos.mean()),
            "min_cosine": float(cos.min()), "similarity_spearman": rho}
