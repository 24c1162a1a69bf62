"""The paragraphs an encoder search measures on: a search split and a disjoint held-out split, with the
source's own embeddings of each (what a candidate's embeddings are compared with).

    paragraphs 0 .. S-1        search: every candidate (and the per-layer sensitivity, on its first ones)
    paragraphs N-H .. N-1      held-out: only the winner is checked here, so the choice is not fitted to it

The paragraphs are the lines of ``--data`` with four words or more (default: the WikiText excerpt's), never
the calibration text. The reference embeddings are saved in the search folder, keyed by the source and the
texts, so a resumed search does not recompute them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from miaotui.errors import MiaotuiError

DEFAULT_SEARCH, DEFAULT_HELDOUT = 64, 32
REFERENCE_FILE = "reference-embeddings.npz"


class SplitError(MiaotuiError):
    """Too little text for the requested splits."""


@dataclass
class TextSplits:
    search: list[str]
    heldout: list[str]
    search_ref: np.ndarray  # (S, D) the source's unnormalised embeddings
    heldout_ref: np.ndarray
    data: str  # the text's file name
    data_sha256: str

    def split_id(self, which: str) -> str:
        """The texts' hash: part of every cache key, so results on other texts are never reused."""
        return texts_sha256(getattr(self, which))[:16]


def texts_sha256(texts: list[str]) -> str:
    return hashlib.sha256("\x00".join(texts).encode()).hexdigest()


def split_sizes(total: int, n_search: int | None, n_heldout: int | None) -> tuple[int, int]:
    """Given sizes, checked against ``total``; defaults: up to 64 and 32, or 2/3 and 1/3 of fewer texts."""
    s = n_search if n_search is not None else min(DEFAULT_SEARCH, max(2, total * 2 // 3))
    h = n_heldout if n_heldout is not None else min(DEFAULT_HELDOUT, max(2, total - s))
    if s < 2 or h < 2:
        raise SplitError(f"the search and held-out splits need at least 2 texts each (got {s}, {h})")
    if s + h > total:
        raise SplitError(f"the data holds {total} paragraphs of four words or more, fewer than {s} search + {h} "
                         "held-out: give fewer --search-texts / --heldout-texts or a longer --data file")
    return s, h


def make_text_splits(source, data: str | Path | None, n_search: int | None, n_heldout: int | None,
                     fingerprint: str, cache_dir: Path | None = None) -> TextSplits:
    """The first ``n_search`` and the last ``n_heldout`` paragraphs of ``data`` with ``source``'s embeddings
    of each (``source``: the fused fp32 ``LoadedEncoder``), reusing ``cache_dir``'s file when it matches."""
    from miaotui.eval.embeddings import eval_texts
    from miaotui.loading.checkpoint import file_sha256
    from miaotui.optimize.encoder_measure import embed

    texts, path = eval_texts(data, limit=None)
    s, h = split_sizes(len(texts), n_search, n_heldout)
    search, heldout = texts[:s], texts[len(texts) - h:]
    ident = hashlib.sha256(f"{fingerprint}\0{texts_sha256(search)}\0{texts_sha256(heldout)}".encode()).hexdigest()
    file = cache_dir / REFERENCE_FILE if cache_dir is not None else None
    refs = None
    if file is not None and file.is_file():
        try:
            with np.load(file) as z:
                if str(z["ident"]) == ident:
                    refs = z["search"], z["heldout"]
        except (OSError, ValueError, KeyError):  # a file cut short by a kill: compute it again
            refs = None
    if refs is None:
        refs = embed(source, search), embed(source, heldout)
        if file is not None:
            tmp = file.with_suffix(".tmp.npz")
            np.savez(tmp, ident=np.array(ident), search=refs[0], heldout=refs[1])
            tmp.replace(file)
    return TextSplits(search, heldout, refs[0], refs[1], path.name, file_sha256(path))
