"""The evaluation text cut into a search split and a disjoint held-out split, with the source's reference.

    windows 0 .. S-1          search: every candidate is measured here (and the sensitivity, on its first ones)
    windows W-H .. W-1        held-out: only the winner is checked here, so the choice is not fitted to it

Both come from the evaluation text (default: the WikiText excerpt), never from calibration text, and the
two never share a token window. The source model's log-probs on each split are computed once and saved in
the output folder (``ReferenceLogits`` files), so a resumed search does not recompute them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from miaotui.eval.data import EvalDataError, default_data_path, text_windows
from miaotui.eval.reference import (ReferenceFileError, ReferenceLogits, compute_reference, model_fingerprint,
                                    tokens_sha256)


@dataclass
class Splits:
    search: ReferenceLogits  # the source's log-probs on the search windows (``.windows``)
    heldout: ReferenceLogits
    data: str  # the text's file name
    data_sha256: str

    def split_id(self, which: str) -> str:
        """The tokens' hash: part of every cache key, so results on other windows are never reused."""
        return tokens_sha256(getattr(self, which).windows)[:16]

    def reference_perplexity(self, which: str) -> float:
        """The source's own perplexity on a split (what ``ppl+3%`` is relative to), from its log-probs."""
        ref: ReferenceLogits = getattr(self, which)
        nll, count = 0.0, 0
        for w in range(ref.windows.shape[0]):
            lp, _ = ref.log_probs(w, w + 1)  # (rows, V) fp64, renormalised
            targets = ref.windows[w, ref.first + 1:]
            nll -= float(lp.gather(1, targets[:, None]).sum())
            count += targets.numel()
        return math.exp(nll / count)


def cut_windows(windows: torch.Tensor, n_search: int, n_heldout: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n_search`` and the last ``n_heldout`` windows, which must not overlap."""
    total = windows.shape[0]
    if n_search < 1 or n_heldout < 1:
        raise EvalDataError(f"--search-windows and --heldout-windows must be at least 1 (got {n_search}, {n_heldout})")
    if n_search + n_heldout > total:
        raise EvalDataError(f"the data holds {total} windows of {windows.shape[1]} tokens, fewer than "
                            f"{n_search} search + {n_heldout} held-out: use fewer windows, a smaller --ctx or "
                            "a longer --data file")
    return windows[:n_search], windows[total - n_heldout:]


def make_splits(source, data: str | Path | None, ctx: int, n_search: int, n_heldout: int,
                cache_dir: Path | None = None, progress: bool = False) -> Splits:
    """Windows of ``data`` (a text file; default the WikiText excerpt) split in two, with the reference
    log-probs of ``source`` (a fused, float ``LoadedModel``) on each, reusing files in ``cache_dir``."""
    path = Path(data) if data is not None else default_data_path()
    if ctx > source.model.max_seq_len:
        raise EvalDataError(f"--ctx {ctx} is longer than the model's context ({source.model.max_seq_len})")
    windows, sha = text_windows(source.tokenizer, path, ctx)
    search_w, heldout_w = cut_windows(windows, n_search, n_heldout)
    fingerprint = model_fingerprint(source.path)
    meta = {"reference": f"{Path(source.path).name} (source)", "fingerprint": fingerprint, "data": path.name,
            "data_sha256": sha}
    refs = {}
    for name, w in (("search", search_w), ("heldout", heldout_w)):
        file = cache_dir / f"reference-{name}.safetensors" if cache_dir is not None else None
        ref = None
        if file is not None and file.is_file():
            try:
                ref = ReferenceLogits.load(file)
                ref.check(fingerprint=fingerprint, data_sha256=sha, vocab=source.model.vocab_size, source=str(file))
                ref = ref.check_windows(w, source=str(file)) if ref.windows.shape == w.shape else None
            except ReferenceFileError:
                ref = None  # made for another model, text or window count: compute it again
        if ref is None:
            ref = compute_reference(source.model, w, meta=meta, progress=progress)
            if file is not None:
                ref.save(file)
        refs[name] = ref
    return Splits(refs["search"], refs["heldout"], path.name, sha)


def remove_reference_files(cache_dir: Path) -> None:
    """After a finished search: the references are large (2 bytes × vocabulary per scored token) and
    cheap to recompute, unlike the candidate results kept beside them."""
    for name in ("search", "heldout"):
        (cache_dir / f"reference-{name}.safetensors").unlink(missing_ok=True)
