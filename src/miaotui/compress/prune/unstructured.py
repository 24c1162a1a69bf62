"""The ``prune`` recipe step: unstructured or N:M sparsity by magnitude, Wanda or SparseGPT, with the same
sparsity in every decoder layer or an OWL allocation. Pruned weights stay dense tensors holding zeros: the
checkpoint format is unchanged, and so is the speed on CPU (dense kernels multiply the zeros too).

    steps:
      - prune: {method: sparsegpt, sparsity: 0.5}
      - prune: {method: wanda, pattern: "2:4"}     # quote N:M in YAML, which reads 2:4 as the number 124
      - prune: {method: wanda, sparsity: 0.6, allocation: owl, owl_lambda: 0.08, owl_m: 5}
      - prune: {method: magnitude, sparsity: 0.3, linears: ["mlp.*"]}
      - quantize: {method: rtn, bits: 8, group_size: null, symmetric: true}   # symmetric keeps zeros zero

As a library::

    record = prune_model(model, PruneConfig(method="wanda", sparsity=0.5), calib_ids)

Wanda and SparseGPT run layer by layer on the calibration tokens (``layerwise.layer_by_layer``): layer i's
statistics come from the outputs of the already pruned layers before it, as in both papers.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from miaotui.compress.layerwise import HessianStat, LayerStack, layer_by_layer, layer_stack
from miaotui.compress.prune.magnitude import magnitude_mask
from miaotui.compress.prune.nm import nm_sparsity, parse_pattern
from miaotui.compress.prune.owl import measure_outlier_ratios, owl_sparsities
from miaotui.compress.prune.sparsegpt import sparsegpt_prune
from miaotui.compress.prune.targets import Target, check_supported, layer_targets, matches
from miaotui.compress.prune.wanda import InputNormStat, wanda_mask
from miaotui.compress.recipe import Context, RecipeError
from miaotui.errors import MiaotuiError

METHODS = ("magnitude", "wanda", "sparsegpt")
ALLOCATIONS = ("uniform", "owl")
COMMON_PARAMS = {"method", "sparsity", "pattern", "allocation", "owl_lambda", "owl_m", "linears"}
METHOD_PARAMS = {"magnitude": set(), "wanda": set(), "sparsegpt": {"block_size", "percdamp"}}
DEFAULT_SPARSITY = 0.5
DEFAULT_BLOCK = 128  # SparseGPT's mask-selection block (the paper's)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class PruneConfig:
    """What to prune and how. ``sparsity``: fraction of each pruned linear's weights set to zero (default
    0.5); ``pattern``: "N:M" instead (keep N of every M consecutive inputs; the sparsity is then 1 − N/M).
    ``allocation``: "uniform" (every layer at ``sparsity``) or "owl" (per layer, mean = ``sparsity``, each
    within ± ``owl_lambda``; outliers: scores above ``owl_m`` × the layer mean). ``linears``: shell patterns
    of the projections to prune, by their unfused names relative to a decoder layer ("q_proj", "mlp.*");
    default every decoder linear (never the embeddings or the output head). SparseGPT: ``block_size``
    columns per mask selection (default 128, rounded up to a multiple of M), ``percdamp`` damping of the
    Hessian diagonal."""

    method: str = "wanda"
    sparsity: float | None = None
    pattern: str | None = None
    allocation: str = "uniform"
    owl_lambda: float = 0.08
    owl_m: float = 5.0
    linears: list[str] | None = None
    block_size: int | None = None
    percdamp: float = 0.01

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise RecipeError(f"prune: method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.sparsity is not None and not (_is_number(self.sparsity) and 0 <= self.sparsity < 1):
            raise RecipeError(f"prune: sparsity must be a number in [0, 1), got {self.sparsity!r}")
        self.nm = None
        if self.pattern is not None:
            if isinstance(self.pattern, int) and not isinstance(self.pattern, bool):
                raise RecipeError(f"prune: pattern must be a string like '2:4', got the number {self.pattern} "
                                  "(YAML reads an unquoted 2:4 as 124: write pattern: \"2:4\")")
            try:
                self.nm = parse_pattern(self.pattern)
            except MiaotuiError as e:
                raise RecipeError(f"prune: pattern: {e}") from None
            implied = nm_sparsity(*self.nm)
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise RecipeError(f"prune: sparsity {self.sparsity} contradicts pattern {self.pattern!r} "
                                  f"(which means sparsity {implied:g}); give one of them")
        if self.allocation not in ALLOCATIONS:
            raise RecipeError(f"prune: allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if self.allocation == "owl":
            if self.nm is not None:
                raise RecipeError("prune: allocation 'owl' varies the sparsity per layer; an N:M pattern fixes "
                                  "it (drop one of pattern and allocation)")
            if not (_is_number(self.owl_lambda) and 0 <= self.owl_lambda):
                raise RecipeError(f"prune: owl_lambda must be a number >= 0, got {self.owl_lambda!r}")
            if not (self.target - self.owl_lambda >= 0 and self.target + self.owl_lambda < 1):
                raise RecipeError(f"prune: owl_lambda {self.owl_lambda} puts layers outside [0, 1) around "
                                  f"sparsity {self.target} (needs sparsity ± owl_lambda within [0, 1))")
            if not (_is_number(self.owl_m) and self.owl_m > 0):
                raise RecipeError(f"prune: owl_m must be a number > 0, got {self.owl_m!r}")
        if isinstance(self.linears, str):
            self.linears = [self.linears]
        if self.linears is not None and (not isinstance(self.linears, list) or not self.linears
                                         or not all(isinstance(p, str) and p for p in self.linears)):
            raise RecipeError(f"prune: linears must be a non-empty list of name patterns, got {self.linears!r}")
        if self.block_size is not None and not (isinstance(self.block_size, int)
                                                and not isinstance(self.block_size, bool) and self.block_size >= 1):
            raise RecipeError(f"prune: block_size must be a positive integer, got {self.block_size!r}")
        if self.nm is not None and self.block_size is not None and self.block_size % self.nm[1]:
            raise RecipeError(f"prune: block_size {self.block_size} must be a multiple of M={self.nm[1]} "
                              f"for pattern {self.pattern!r}")
        if not (_is_number(self.percdamp) and self.percdamp >= 0):
            raise RecipeError(f"prune: percdamp must be a number >= 0, got {self.percdamp!r}")

    @property
    def target(self) -> float:
        """The mean sparsity asked for."""
        if self.nm is not None:
            return nm_sparsity(*self.nm)
        return DEFAULT_SPARSITY if self.sparsity is None else float(self.sparsity)

    @property
    def block(self) -> int:
        """SparseGPT's block width: ``block_size``, or 128 rounded up to a multiple of M."""
        if self.block_size is not None:
            return self.block_size
        m = self.nm[1] if self.nm is not None else 1
        return -(-DEFAULT_BLOCK // m) * m

    @property
    def needs_calibration(self) -> bool:
        return self.method != "magnitude" or self.allocation == "owl"

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "PruneConfig":
        """From a recipe step's mapping; unknown or misplaced parameters raise RecipeError naming them."""
        p = dict(params)
        method = p.get("method", cls.method)
        if method not in METHODS:
            raise RecipeError(f"prune: method must be one of {', '.join(METHODS)}, got {method!r}")
        allowed = COMMON_PARAMS | METHOD_PARAMS[method]
        unknown = set(p) - allowed
        if unknown:
            raise RecipeError(f"prune/{method}: unknown parameter(s) {', '.join(sorted(unknown))} "
                              f"(allowed: {', '.join(sorted(allowed))})")
        if p.get("allocation", "uniform") != "owl" and {"owl_lambda", "owl_m"} & set(p):
            raise RecipeError("prune: owl_lambda and owl_m apply only with allocation: owl")
        return cls(**{f.name: p[f.name] for f in fields(cls) if f.name in p})


def run_prune(ctx: Context, params: dict[str, Any]) -> dict[str, Any]:
    """Recipe step ``prune``: validate, calibrate if the method needs it, prune ``ctx.loaded.model`` in place."""
    config = PruneConfig.from_params(params)
    model = ctx.loaded.model
    try:
        check_supported(model)
    except MiaotuiError as e:
        raise RecipeError(f"prune: {e}") from None
    ids = ctx.calib_ids() if config.needs_calibration else None
    return prune_model(model, config, ids, progress=ctx.progress)


def _targets(stack: LayerStack, config: PruneConfig) -> list[list[Target]]:
    """Per decoder layer, the projections to prune; checks the patterns and N:M widths first."""
    per_layer = [[t for t in layer_targets(stack.linears(layer), layer) if matches(t, config.linears)]
                 for layer in stack.layers]
    for pattern in config.linears or []:
        if not any(matches(t, [pattern]) for ts in per_layer for t in ts):
            names = sorted({t.name for t in layer_targets(stack.linears(stack.layers[0]), stack.layers[0])})
            raise RecipeError(f"prune: linears pattern {pattern!r} matches no float decoder linear "
                              f"(names: {', '.join(names) or 'none'})")
    if not any(per_layer):
        raise RecipeError("prune: the model has no float decoder linears left to prune "
                          "(prune before quantizing)")
    if config.nm is not None:
        m = config.nm[1]
        widths = {(t.name, lin.in_features) for layer, ts in zip(stack.layers, per_layer)
                  for t in ts for lin in [stack.linears(layer)[t.linear]]}
        bad = sorted(f"{n} ({w})" for n, w in widths if w % m)
        if bad:
            raise RecipeError(f"prune: pattern {config.pattern!r} needs input widths divisible by {m}: "
                              f"{', '.join(bad)}")
    return per_layer


def _by_linear(targets: list[Target]) -> dict[str, list[slice]]:
    out: dict[str, list[slice]] = defaultdict(list)
    for t in targets:
        out[t.linear].append(t.rows)
    return dict(out)


@torch.no_grad()
def _prune_sparsegpt(lin: nn.Linear, h: torch.Tensor, rows: list[slice], sparsity: float,
                     config: PruneConfig) -> None:
    """SparseGPT on the pruned rows of one linear, each part ranked on its own (one shared H⁻¹ pass)."""
    index = torch.cat([torch.arange(r.start, r.stop) for r in rows])
    groups, start = [], 0
    for r in rows:
        groups.append(slice(start, start + r.stop - r.start))
        start += r.stop - r.start
    new = sparsegpt_prune(lin.weight[index], h, sparsity, config.nm, groups, config.block, config.percdamp)
    lin.weight[index] = new.to(lin.weight.dtype)


@torch.no_grad()
def prune_model(model: nn.Module, config: PruneConfig, calib_ids: torch.Tensor | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Prune ``model``'s decoder linears in place (a llama-family or GPT-2 ``CausalLM``; an unfused llama
    model is fused first, which changes nothing it computes nor how it is pruned).

    ``calib_ids`` (N, T): calibration tokens, needed by Wanda, SparseGPT and OWL. Returns a record: the
    achieved sparsity over the pruned linears and over all parameters, per layer and per projection."""
    from tqdm import tqdm

    check_supported(model)
    stack = layer_stack(model)
    per_layer = _targets(stack, config)
    if config.needs_calibration and calib_ids is None:
        raise RecipeError(f"prune: method {config.method!r} with allocation {config.allocation!r} needs "
                          "calibration tokens")
    n_layers = len(stack.layers)
    ratios = None
    if config.allocation == "owl":
        ratios = measure_outlier_ratios(model, calib_ids, config.owl_m,
                                        lambda calib: _by_linear(per_layer[calib.index]), progress=progress)
        sparsities = owl_sparsities(ratios, config.target, config.owl_lambda)
    else:
        sparsities = [config.target] * n_layers

    if config.method == "magnitude":
        for i in tqdm(range(n_layers), desc="magnitude", unit="layer", disable=not progress):
            linears = stack.linears(stack.layers[i])
            for t in per_layer[i]:
                w = linears[t.linear].weight[t.rows]
                w.masked_fill_(~magnitude_mask(w, sparsities[i], config.nm), 0)
    else:
        for calib in layer_by_layer(model, calib_ids, progress=progress, desc=config.method):
            i, groups = calib.index, _by_linear(per_layer[calib.index])
            if config.method == "wanda":
                stats = calib.capture({n: InputNormStat(calib.linears[n].in_features) for n in groups})
                for name, rows in groups.items():
                    for r in rows:
                        w = calib.linears[name].weight[r]
                        w.masked_fill_(~wanda_mask(w, stats[name].norm, sparsities[i], config.nm), 0)
            else:
                stats = calib.capture({n: HessianStat(calib.linears[n].in_features) for n in groups})
                for name, rows in groups.items():
                    _prune_sparsegpt(calib.linears[name], stats[name].h, rows, sparsities[i], config)
            calib.advance()  # the next layer calibrates on this layer's pruned outputs
    return _record(model, stack, per_layer, config, sparsities, ratios)


def _record(model: nn.Module, stack: LayerStack, per_layer: list[list[Target]], config: PruneConfig,
            sparsities: list[float], ratios: list[float] | None) -> dict[str, Any]:
    """Achieved sparsity, counted from the zeros actually in the weights."""
    layer_sparsity, by_name = [], defaultdict(lambda: [0, 0])
    zeros_all = total_all = 0
    for layer, ts in zip(stack.layers, per_layer):
        linears = stack.linears(layer)
        zeros = total = 0
        for t in ts:
            w = linears[t.linear].weight[t.rows]
            z, n = int((w == 0).sum()), w.numel()
            zeros, total = zeros + z, total + n
            by_name[t.name][0] += z
            by_name[t.name][1] += n
        layer_sparsity.append(round(zeros / total, 4) if total else None)
        zeros_all, total_all = zeros_all + zeros, total_all + total
    params = {id(p): p for p in model.parameters()}.values()  # a tied head counts once
    model_zeros = sum(int((p == 0).sum()) for p in params)
    record: dict[str, Any] = {
        "method": config.method, "pattern": config.pattern, "allocation": config.allocation,
        "target_sparsity": round(config.target, 4),
        "sparsity": round(zeros_all / total_all, 6),
        "pruned_weights": zeros_all, "weights": total_all,
        "model_sparsity": round(model_zeros / sum(p.numel() for p in params), 6),
        "layer_sparsity": layer_sparsity,
        "linear_sparsity": {n: round(z / t, 4) for n, (z, t) in by_name.items()},
    }
    if ratios is not None:
        record["owl"] = {"lambda": config.owl_lambda, "m": config.owl_m,
                         "outlier_ratio": [round(r, 5) for r in ratios],
                         "layer_target": [round(s, 4) for s in sparsities]}
    return record
