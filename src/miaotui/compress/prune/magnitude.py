"""Magnitude pruning: zero the weights of smallest |W|, ranked over the whole linear (the classic baseline,
Han et al. 2015; LLM pruning papers compare against it this way) or per N:M group. No calibration."""

from __future__ import annotations

import torch

from miaotui.compress.prune.masks import select_mask


@torch.no_grad()
def magnitude_mask(w: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Keep-mask of ``w`` (out, in): the ``sparsity`` fraction of smallest |w| over the whole tensor is
    dropped, or all but the N largest of every M consecutive inputs of a row with ``nm=(N, M)``."""
    return select_mask(w.detach().float().abs(), sparsity, nm, per_row=False)
