"""SmoothQuant (Xiao et al. 2022): W8A8 suffers from a few activation channels with huge values; divide
them down by ``s_j = max|x_j|^α / max|w_j|^(1-α)`` (folded into the previous norm) and multiply the weight
columns by ``s_j``, moving part of the outlier into the weights, which are quantized per output channel
and tolerate it. The float function is unchanged; the runtime quantizes activations per token.
"""

from __future__ import annotations

import torch
from torch import nn

from miaotui.compress.layerwise import ChannelStat, ScaleGroup, fold_scale, layer_by_layer
from miaotui.compress.quant.qtensor import QuantizedWeight, quantize_rtn


@torch.no_grad()
def smooth_scale(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5) -> torch.Tensor:
    """Per-input-channel s from the activations' max |x| and the weights' max |w| over all output rows."""
    w_max = torch.cat([w.float() for w in weights]).abs().amax(0)
    a = act_max.float()
    s = a.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    # a channel that is never active (or has no weight) gives no information: leave it alone
    return torch.where((a > 0) & (w_max > 0), s.clamp(min=1e-5), torch.ones_like(s))


@torch.no_grad()
def smooth_layer(groups: list[ScaleGroup], linears: dict[str, nn.Linear], act_max: dict[str, torch.Tensor],
                 alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """Fold the smoothing scale of each norm-preceded group in place; returns the scales by group name."""
    scales = {}
    for grp in groups:
        if isinstance(grp.prev, nn.Linear):  # the paper smooths only what follows a norm (qkv, fc1)
            continue
        s = smooth_scale(act_max[grp.linears[0]], [linears[n].weight for n in grp.linears], alpha)
        fold_scale(grp, s, linears)
        scales[grp.name] = s
    return scales


def quantize_model_smoothquant(model: nn.Module, calib_ids: torch.Tensor, alpha: float = 0.5, bits: int = 8,
                               progress: bool = True) -> dict[str, QuantizedWeight]:
    """Smooth every layer in place (float function unchanged), then int8 per-channel symmetric weights of
    every decoder linear for a W8A8 runtime."""
    result: dict[str, QuantizedWeight] = {}
    for calib in layer_by_layer(model, calib_ids, progress=progress, desc="smoothquant"):
        stats = calib.capture({n: ChannelStat(lin.in_features) for n, lin in calib.linears.items()})
        smooth_layer(calib.stack.scale_groups(calib.layer), calib.linears,
                     {n: st.abs_max for n, st in stats.items()}, alpha)
        qws = {n: quantize_rtn(lin.weight, bits, None, symmetric=True) for n, lin in calib.linears.items()}
        # activations are quantized at run time, so the next layer sees float (smoothed = original) outputs
        calib.advance()
        result.update({calib.qualified(n): qw for n, qw in qws.items()})
    return result
