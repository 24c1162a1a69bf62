"""AWQ (Lin et al. 2023): protect the weights that meet large activations by scaling their input channels up
before rounding (s > 1 shrinks their relative rounding error) and the activations down by the same factor.

Per scale group (linears sharing an input, see ``layerwise.ScaleGroup``) the scale is
``s = mean|x|^α / mean|ŵ|^(1-α)`` (ŵ: weights normalised per group), with α searched on a grid to minimise
the linears' output error on the calibration inputs; ``s`` is folded into the previous norm (or the previous
linear's rows: v → o, up → down), so the float function is unchanged. An optional clipping search then
shrinks each group's min/max range where that lowers the output error.

Output errors are measured through the input Gram matrix G = Σ x xᵀ: ‖X Δᵀ‖² = Σ_rows Δ G Δᵀ, exact over
every calibration token at a cost independent of how many there are.
"""

from __future__ import annotations

import torch
from torch import nn

from miaotui.compress.layerwise import ChannelStat, HessianStat, ScaleGroup, fold_scale, layer_by_layer
from miaotui.compress.quant.mixed import module_settings
from miaotui.compress.quant.qtensor import QuantizedWeight, check_group, quantize_rtn


def output_error(delta: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Σ over calibration rows x of ‖Δ x‖², given Δ (out, in) and G = Σ x xᵀ (in, in)."""
    return ((delta @ gram) * delta).sum()


def _fake_quant(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    return quantize_rtn(w, bits, group_size, symmetric).dequantize()


@torch.no_grad()
def search_scale(weights: list[torch.Tensor], gram: torch.Tensor, act_mean: torch.Tensor, group: ScaleGroup,
                 bits: int, group_size: int | None, symmetric: bool, n_grid: int = 20,
                 duo_scaling: bool = True) -> torch.Tensor:
    """The per-``prev``-row scale minimising the output error of RTN-quantizing ``weights`` (each (out, in))
    scaled by it. ``s = 1`` (plain RTN) is always a candidate, so the result is never worse on the calibration
    data. ``act_mean``: mean |x| per input channel."""
    w = torch.cat([x.float() for x in weights])
    g = check_group(w.shape[1], group_size)
    # how large each input channel's weights are relative to their group's range
    wn = w.abs().view(w.shape[0], -1, g)
    wn = (wn / wn.amax(-1, keepdim=True).clamp(min=1e-8)).view_as(w)
    x_mean = group.reduce(act_mean.float()).clamp(min=1e-8)
    w_mean = group.reduce(wn.mean(0)).clamp(min=1e-8)

    def loss(s: torch.Tensor) -> float:
        full = group.expand(s)
        return float(output_error(w - _fake_quant(w * full, bits, g, symmetric) / full, gram))

    best_s, best = torch.ones_like(x_mean), loss(torch.ones_like(x_mean))
    for i in range(n_grid):
        alpha = i / n_grid
        s = x_mean.pow(alpha) / w_mean.pow(1 - alpha) if duo_scaling else x_mean.pow(alpha)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1 (the grid is scale-invariant anyway)
        err = loss(s)
        if err < best:
            best, best_s = err, s
    return best_s


@torch.no_grad()
def search_clip(w: torch.Tensor, gram: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                n_grid: int = 20, max_shrink: float = 0.5) -> torch.Tensor:
    """``w`` with each (row, group) range shrunk by the factor in [1 - max_shrink, 1] that minimises that
    group's share of the output error (its block of G; cross-group terms are ignored, as in AWQ)."""
    out_f, in_f = w.shape
    g = check_group(in_f, group_size)
    ng = in_f // g
    wg = w.float().view(out_f, ng, g)
    idx = torch.arange(ng)
    blocks = gram.view(ng, g, ng, g)[idx, :, idx, :]  # (ng, g, g) diagonal blocks
    if symmetric:
        hi = wg.abs().amax(-1, keepdim=True)
        lo = -hi
    else:  # the grid always contains 0 (see group_params)
        lo, hi = wg.amin(-1, keepdim=True).clamp(max=0), wg.amax(-1, keepdim=True).clamp(min=0)
    best_err = torch.full((out_f, ng), float("inf"))
    best_w = wg.clone()
    for i in range(int(max_shrink * n_grid) + 1):
        r = 1 - i / n_grid
        wc = torch.maximum(torch.minimum(wg, hi * r), lo * r)
        d = wg - _fake_quant(wc.reshape(out_f, in_f), bits, g, symmetric).view(out_f, ng, g)
        err = torch.einsum("ogi,gij,ogj->og", d, blocks, d)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_w = torch.where(better[..., None], wc, best_w)
    return best_w.view(out_f, in_f)


@torch.no_grad()
def awq_layer(groups: list[ScaleGroup], linears: dict[str, nn.Linear], grams: dict[str, torch.Tensor],
              act_means: dict[str, torch.Tensor], bits: int = 4, group_size: int | None = 128,
              symmetric: bool = False, n_grid: int = 20, duo_scaling: bool = True,
              clip: bool = True, settings: dict[str, dict | None] | None = None) -> dict[str, QuantizedWeight]:
    """Search and fold each group's scale (modifies the modules in place, same float function), then quantize
    every linear in ``linears`` (clipped if asked). ``grams``/``act_means``: per linear, of its inputs.
    ``settings``: per linear, its own bits / group_size / symmetric, or None to leave it float (mixed
    precision); a scale group searches with the grid of its first quantized linear."""
    base = {"bits": bits, "group_size": group_size, "symmetric": symmetric}
    settings = {n: (settings or {}).get(n, base) for n in linears}
    grams, act_means = dict(grams), dict(act_means)
    for grp in groups:
        quantized = [n for n in grp.linears if settings[n] is not None]
        if not quantized:  # nothing here is rounded: no error to protect against
            continue
        s0 = settings[quantized[0]]
        gram = grams[grp.linears[0]]  # the linears of a group read the same input
        s = search_scale([linears[n].weight for n in quantized], gram, act_means[grp.linears[0]], grp,
                         s0["bits"], s0["group_size"], s0["symmetric"], n_grid, duo_scaling)
        fold_scale(grp, s, linears)
        full = grp.expand(s)
        for n in grp.linears:  # the folded linears now see x / s
            grams[n] = grams[n] / full[:, None] / full[None, :]
    out = {}
    for name, lin in linears.items():
        st = settings[name]
        if st is None:
            continue
        w = lin.weight.float()
        if clip:
            w = search_clip(w, grams[name], st["bits"], st["group_size"], st["symmetric"], n_grid)
        out[name] = quantize_rtn(w, st["bits"], st["group_size"], st["symmetric"])
    return out


def quantize_model_awq(model: nn.Module, calib_ids: torch.Tensor, bits: int = 4, group_size: int | None = 128,
                       symmetric: bool = False, n_grid: int = 20, duo_scaling: bool = True, clip: bool = True,
                       scale_v_o: bool = True, progress: bool = True,
                       overrides: dict[str, dict] | None = None) -> dict[str, QuantizedWeight]:
    """AWQ every decoder linear, layer by layer on ``calib_ids`` (N, T). The scales are folded into the model
    (its float function is unchanged); quantize the returned weights into that same, scaled model.
    ``overrides``: per-module bits / group size / symmetry by glob (``quant/mixed.py``)."""
    base = {"bits": bits, "group_size": group_size, "symmetric": symmetric}
    result: dict[str, QuantizedWeight] = {}
    for calib in layer_by_layer(model, calib_ids, progress=progress, desc="awq"):
        settings = {n: module_settings(calib.qualified(n), base, overrides) for n in calib.linears}
        stats = calib.capture({n: (HessianStat(lin.in_features), ChannelStat(lin.in_features))
                               for n, lin in calib.linears.items()})
        groups = [g for g in calib.stack.scale_groups(calib.layer) if scale_v_o or g.name != "v_o"]
        # HessianStat holds 2/N Σ x xᵀ: a constant multiple of G, which no argmin cares about
        qws = awq_layer(groups, calib.linears, {n: st[0].h for n, st in stats.items()},
                        {n: st[1].abs_mean for n, st in stats.items()}, bits, group_size, symmetric, n_grid,
                        duo_scaling, clip, settings)
        calib.advance(qws)
        result.update({calib.qualified(n): qw for n, qw in qws.items()})
    return result

