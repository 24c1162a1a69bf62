"""OWL, outlier-weighed layerwise sparsity (Yin et al. 2023): decoder layers with more outlier weights
(large |W|·‖x‖, Wanda's score) are pruned less, the others more, at the same mean sparsity.

A layer's outlier ratio is the fraction of its scores (over all its pruned linears together) above ``m``
times their mean. The paper maps the ratios linearly onto sparsities ``target ± λ``:

    s_i = target − c · (r_i − mean r),   c = 2λ / (max r − min r)

which keeps the mean at the target and spreads the layers over a range of 2λ. When the ratios are skewed
(one layer far from the mean) that formula puts a layer more than λ from the target; here ``c`` then shrinks
until every layer is within [target − λ, target + λ], the bound the paper states.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from miaotui.compress.layerwise import LayerCalib, layer_by_layer
from miaotui.compress.prune.wanda import InputNormStat, wanda_score


def outlier_ratio(scores: Sequence[torch.Tensor], m: float) -> float:
    """Fraction of all entries of ``scores`` above ``m`` times their overall mean."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    return float((flat > m * flat.mean()).float().mean())


def owl_sparsities(ratios: Sequence[float], target: float, lam: float) -> list[float]:
    """Per-layer sparsities from outlier ratios: mean exactly ``target``, each within ``target ± lam``,
    higher ratio → lower sparsity; equal ratios (or ``lam = 0``) give ``target`` everywhere."""
    r = torch.tensor(list(ratios), dtype=torch.float64)
    spread = float(r.max() - r.min()) if len(r) else 0.0
    if spread == 0.0 or lam == 0:
        return [float(target)] * len(r)
    dev = r - r.mean()
    c = min(2 * lam / spread, lam / float(dev.abs().max()))
    return [float(target - c * x) for x in dev]


@torch.no_grad()
def measure_outlier_ratios(model: nn.Module, calib_ids: torch.Tensor, m: float,
                           targets: Callable[[LayerCalib], dict[str, list[slice]]],
                           progress: bool = True) -> list[float]:
    """Each decoder layer's outlier ratio on the dense model (one calibration pass, nothing changed).

    ``targets(calib)`` names the linears to score (relative to the layer) and the row ranges of each that
    will be pruned."""
    ratios = []
    for calib in layer_by_layer(model, calib_ids, progress=progress, desc="owl outliers"):
        rows = targets(calib)
        stats = calib.capture({n: InputNormStat(calib.linears[n].in_features) for n in rows})
        scores = [wanda_score(calib.linears[n].weight[r], stats[n].norm) for n, rs in rows.items() for r in rs]
        ratios.append(outlier_ratio(scores, m))
    return ratios
