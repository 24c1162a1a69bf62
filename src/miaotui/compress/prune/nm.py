"""N:M semi-structured sparsity: at most N non-zero weights in every M consecutive input columns of a row
(NVIDIA's convention: "2:4" keeps 2 of every 4, i.e. 50 % sparse; "1:4" keeps 1, 75 % sparse).

The groups run along the input dimension, the one sparse tensor cores (and future sparse CPU kernels)
compress. Magnitude and Wanda pick the N largest scores of each group once; SparseGPT picks them column
group by column group while it updates the weights (``sparsegpt.py``).
"""

from __future__ import annotations

import re

import torch

from miaotui.errors import MiaotuiError

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``"2:4"`` → ``(2, 4)``; N ≥ 1 non-zeros kept of every M > N."""
    match = _PATTERN.match(pattern) if isinstance(pattern, str) else None
    if match is None:
        raise MiaotuiError(f"an N:M pattern is a string like '2:4', got {pattern!r}")
    n, m = int(match[1]), int(match[2])
    if not 1 <= n < m:
        raise MiaotuiError(f"N:M pattern {pattern!r} needs 1 <= N < M")
    return n, m


def nm_sparsity(n: int, m: int) -> float:
    return 1.0 - n / m


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask (out, in) keeping the ``n`` highest scores of every ``m`` consecutive columns per row."""
    rows, cols = score.shape
    if cols % m:
        raise MiaotuiError(f"N:M with M={m} needs the input width to be a multiple of {m}, got {cols}")
    groups = score.reshape(rows, cols // m, m)
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(2, torch.topk(groups, m - n, dim=2, largest=False).indices, False)
    return keep.view(rows, cols)


def is_nm(w: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive columns of every row has at most ``n`` non-zeros."""
    rows, cols = w.shape
    return cols % m == 0 and bool(((w != 0).reshape(rows, cols // m, m).sum(2) <= n).all())
