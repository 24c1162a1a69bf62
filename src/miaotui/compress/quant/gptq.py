"""GPTQ (Frantar et al. 2022): quantize a weight one input column at a time, pushing each column's rounding
error onto the columns not yet quantized, weighted by the inverse Hessian H = 2/N Σ x xᵀ of the inputs.

Lazy batches: the error is applied inside a block of ``block_size`` columns at once per column, and to the
rest of the matrix once per block (one matmul). Act-order quantizes columns of large H diagonal first; with
it the group grids are fixed up front from the original weight ("static groups"), so the result keeps
contiguous groups in the original column order and the runtime needs no permutation.
"""

from __future__ import annotations

import torch
from torch import nn

from miaotui.compress.layerwise import HessianStat, layer_by_layer
from miaotui.compress.quant.mixed import module_settings
from miaotui.compress.quant.qtensor import QuantizedWeight, check_group, group_params, quantize_with


def _inverse_hessian_chol(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹ (after damping): row i holds what column i's error does to columns ≥ i."""
    damp = percdamp * torch.diag(h).mean()
    idx = torch.arange(h.shape[0])
    for attempt in range(6):  # too few samples can leave H singular: damp harder until it factors
        hd = h.clone()
        hd[idx, idx] += damp * (10 ** attempt)
        chol, info = torch.linalg.cholesky_ex(hd)
        if info == 0:
            hinv = torch.cholesky_inverse(chol)
            return torch.linalg.cholesky(hinv, upper=True)
    raise RuntimeError("GPTQ: the Hessian is not positive definite even with heavy damping")


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int = 4, group_size: int | None = 128,
                  symmetric: bool = False, percdamp: float = 0.01, act_order: bool = False,
                  block_size: int = 128) -> QuantizedWeight:
    """Quantize ``w`` (out, in) given the input Hessian ``h`` (in, in); returns the codes in the original order."""
    out_f, in_f = w.shape
    g = check_group(in_f, group_size)
    W = w.detach().float().clone()
    H = h.detach().float().clone()
    dead = torch.diag(H) == 0  # inputs never active: any weight is fine, zero keeps it simple
    H[dead, dead] = 1
    W[:, dead] = 0

    n_groups = in_f // g
    scale = torch.empty(out_f, n_groups)
    zero = None if symmetric else torch.empty(out_f, n_groups)
    # grids fixed before any update: per channel always (the standard), per group with act-order (static)
    static = g == in_f or act_order
    if static:
        s0, z0 = group_params(W.view(out_f, n_groups, g), bits, symmetric)
        scale.copy_(s0)
        if zero is not None:
            zero.copy_(z0)

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(in_f)
    W, H = W[:, perm], H[perm][:, perm]
    group_of = perm // g  # the (original-order) group each permuted column belongs to
    Hinv = _inverse_hessian_chol(H, percdamp)

    Q = torch.zeros(out_f, in_f)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if not static and col % g == 0:
                # lazy grid from the already-updated weights of this group (in this block and beyond it)
                cur = torch.cat([W1[:, i:], W[:, i2:col + g]], dim=1)[:, :g]
                sg, zg = group_params(cur, bits, symmetric)
                scale[:, col // g] = sg
                if zero is not None:
                    zero[:, col // g] = zg
            gi = group_of[col]
            s = scale[:, gi:gi + 1]
            z = zero[:, gi:gi + 1] if zero is not None else None
            wc = W1[:, i:i + 1]
            q = quantize_with(wc, s.squeeze(1), None if z is None else z.squeeze(1), bits)  # (out, 1)
            Q[:, col] = q[:, 0]
            dq = (q - z if z is not None else q) * s
            err = (wc - dq) / Hinv1[i, i]
            W1[:, i:] -= err * Hinv1[i:i + 1, i:]
            Err1[:, i:i + 1] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # the lazy batch update of everything after the block

    Q = Q[:, torch.argsort(perm)]
    return QuantizedWeight(q=Q.to(torch.int16), scale=scale, zero=zero, bits=bits, group_size=g)


def quantize_model_gptq(model: nn.Module, calib_ids: torch.Tensor, bits: int = 4, group_size: int | None = 128,
                        symmetric: bool = False, percdamp: float = 0.01, act_order: bool = False,
                        block_size: int = 128, progress: bool = True,
                        overrides: dict[str, dict] | None = None) -> dict[str, QuantizedWeight]:
    """GPTQ every decoder linear, layer by layer on ``calib_ids`` (N, T); the model's weights are unchanged.
    ``overrides``: per-module bits / group size / symmetry by glob (``quant/mixed.py``); a skipped module
    stays float, and the next layers are calibrated on its float outputs."""
    base = {"bits": bits, "group_size": group_size, "symmetric": symmetric}
    result: dict[str, QuantizedWeight] = {}
    for calib in layer_by_layer(model, calib_ids, progress=progress, desc="gptq"):
        settings = {n: module_settings(calib.qualified(n), base, overrides) for n in calib.linears}
        todo = {n: lin for n, lin in calib.linears.items() if settings[n] is not None}
        stats = calib.capture({n: HessianStat(lin.in_features) for n, lin in todo.items()}) if todo else {}
        qws = {n: gptq_quantize(lin.weight, stats[n].h, settings[n]["bits"], settings[n]["group_size"],
                                settings[n]["symmetric"], percdamp, act_order, block_size)
               for n, lin in todo.items()}
        calib.advance(qws)
        result.update({calib.qualified(n): qw for n, qw in qws.items()})
    return result
