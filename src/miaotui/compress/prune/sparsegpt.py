"""SparseGPT (Frantar & Alistarh 2023): prune with an optimal-brain-surgeon update, one input column at a
time, so the kept weights absorb the error of the pruned ones; masks are chosen adaptively per block.

For the layer loss ‖XWᵀ − XŴᵀ‖² with H = 2/N Σ x xᵀ, removing weight w_ij costs w_ij² / [H⁻¹]_jj and is
best compensated by moving the not-yet-processed weights of row i along row j of H⁻¹. Processing columns
left to right with the upper Cholesky factor of H⁻¹ (as GPTQ does for rounding) makes that update exact and
shared by all rows. The mask of each block of ``block_size`` columns is chosen when the block is reached,
from the weights as already updated by the blocks before it (the paper's adaptive mask selection); with
N:M, each group of M columns is chosen when its first column is reached.
"""

from __future__ import annotations

import torch

from miaotui.compress.prune.masks import n_pruned
# GPTQ's damped inverse-Hessian Cholesky factor is exactly what the OBS update needs: one implementation
from miaotui.compress.quant.gptq import _inverse_hessian_chol


@torch.no_grad()
def sparsegpt_prune(w: torch.Tensor, h: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None,
                    row_groups: list[slice] | None = None, block_size: int = 128,
                    percdamp: float = 0.01) -> torch.Tensor:
    """The pruned and updated weight (out, in), float32, given the input Hessian ``h`` (in, in).

    Unstructured: in every block of ``block_size`` columns, the ``sparsity`` fraction of lowest
    w²/[H⁻¹]²_jj is pruned within each of ``row_groups`` (default: all rows as one group). Pass the row
    ranges of a fused linear's parts (q/k/v, gate/up) so each part is ranked on its own, as if unfused.
    N:M (``nm=(N, M)``): every M consecutive columns of a row keep N weights; ``block_size`` must be a
    multiple of M.
    """
    out_f, in_f = w.shape
    if nm is not None and block_size % nm[1]:
        raise ValueError(f"SparseGPT N:M needs block_size ({block_size}) to be a multiple of M ({nm[1]})")
    groups = row_groups or [slice(0, out_f)]
    W = w.detach().float().clone()
    H = h.detach().float().clone()
    dead = torch.diag(H) == 0  # inputs never active: their weights cost nothing to prune
    H[dead, dead] = 1
    Hinv = _inverse_hessian_chol(H, percdamp)

    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        pruned = torch.zeros_like(W1, dtype=torch.bool)
        if nm is None:
            score = W1.pow(2) / d.pow(2)[None, :]
            score[:, dead[i1:i2]] = 0
            for g in groups:
                s = score[g].reshape(-1)
                k = n_pruned(s.numel(), sparsity)
                if k:
                    pruned[g].view(-1)[torch.topk(s, k, largest=False).indices] = True
        n, m = nm or (0, 0)
        for i in range(i2 - i1):
            if nm is not None and i % m == 0:  # this N:M group, scored on the weights as updated so far
                s = W1[:, i:i + m].pow(2) / d[i:i + m].pow(2)[None, :]
                s[:, dead[i1 + i:i1 + i + m]] = 0
                pruned[:, i:i + m].scatter_(1, torch.topk(s, m - n, dim=1, largest=False).indices, True)
            col = W1[:, i]
            q = torch.where(pruned[:, i], 0.0, col)
            Q1[:, i] = q
            err = (col - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i:i + 1, i:]  # OBS: the rest of the block compensates
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch: the columns after the block, in one matmul
    return W
