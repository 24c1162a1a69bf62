"""Score → keep-mask: zero the lowest-scoring weights, per output row or over a whole tensor.

Every pruner ranks weights by a score (|W|, Wanda's |W|·‖x‖, SparseGPT's w²/[H⁻¹]²ᵢᵢ) and differs only
in the score and the group the ranking runs over. Counts are exact (``round(sparsity · size)`` per group,
ties broken by position), so a test can check them to the weight.
"""

from __future__ import annotations

import math

import torch


def n_pruned(size: int, sparsity: float) -> int:
    """How many of ``size`` weights a group at ``sparsity`` loses: the nearest integer (halves round up)."""
    return min(size, math.floor(sparsity * size + 0.5))


def lowest_mask(score: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Keep-mask (bool, like ``score``) with the ``sparsity`` lowest scores of each row (``per_row``) or of
    the whole 2-D tensor set False."""
    keep = torch.ones_like(score, dtype=torch.bool)
    if per_row:
        k = n_pruned(score.shape[1], sparsity)
        if k:
            keep.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, False)
    else:
        k = n_pruned(score.numel(), sparsity)
        if k:
            keep.view(-1)[torch.topk(score.reshape(-1), k, largest=False).indices] = False
    return keep


def select_mask(score: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, per_row: bool) -> torch.Tensor:
    """N:M when ``nm`` is given (then ``sparsity`` is implied by it), else ``lowest_mask``."""
    if nm is not None:
        from miaotui.compress.prune.nm import nm_mask

        return nm_mask(score, *nm)
    return lowest_mask(score, sparsity, per_row)
