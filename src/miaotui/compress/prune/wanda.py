"""Wanda (Sun et al. 2023): prune by |W_ij| · ‖x_j‖₂, weight magnitude times the norm of its input channel
over the calibration tokens, ranked within each output row (the paper's comparison group).

A small weight on an input channel that carries large activations (LLMs have a few such outlier channels)
matters more to the output than its magnitude says; the norm accounts for that. No weight update.
"""

from __future__ import annotations

import torch

from miaotui.compress.prune.masks import select_mask


class InputNormStat:
    """Σ x_j² per input channel over every calibration row: ``norm`` is ‖x_j‖₂ (Wanda's activation factor)."""

    def __init__(self, dim: int):
        self.sumsq = torch.zeros(dim, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:  # x: (rows, in)
        self.sumsq += x.float().pow(2).sum(0, dtype=torch.float64)
        self.n += x.shape[0]

    @property
    def norm(self) -> torch.Tensor:
        return self.sumsq.sqrt().float()


def wanda_score(w: torch.Tensor, in_norm: torch.Tensor) -> torch.Tensor:
    """|W| · ‖x‖ per weight: (out, in) from the weight and the per-input-channel norm (in,)."""
    return w.detach().float().abs() * in_norm.float()[None, :]


@torch.no_grad()
def wanda_mask(w: torch.Tensor, in_norm: torch.Tensor, sparsity: float,
               nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Keep-mask of ``w`` (out, in): per output row the ``sparsity`` fraction of lowest |W|·‖x‖ is dropped
    (rows are independent outputs, so a fused q/k/v or gate/up linear prunes exactly as its parts would),
    or all but the N highest of every M consecutive inputs with ``nm=(N, M)``."""
    return select_mask(wanda_score(w, in_norm), sparsity, nm, per_row=True)
