"""Low-rank factorisation: replace a linear's weight W (out × in) by B·A, B (out × r), A (r × in).

Activation-aware by default (SVD-LLM, Wang et al. 2024): what matters is the error on the layer's *outputs*,
||(W - B·A) Xᵀ||, not on the weights. With the calibration inputs' Gram matrix XᵀX = S·Sᵀ (Cholesky), the
truncated SVD of W·S minimises exactly that, and un-whitening (A ← A·S⁻¹) maps it back:

    W·S = U Σ Vᵀ   →   B = U_r Σ_r^½,  A = Σ_r^½ V_rᵀ S⁻¹          (full rank: B·A = W)

Without whitening it is the plain truncated SVD of W (the best approximation of the weights).

The rank is chosen per linear from ``ratio`` (the fraction of the linear's parameters to keep),
``energy`` (the smallest rank holding that fraction of Σ², of the whitened spectrum when whitening) or a
fixed ``rank``, rounded to a multiple of ``multiple_of``. A linear is factorised only when B·A has fewer
parameters than W. ``FactorizedLinear`` is an ``nn.Module`` with two ``nn.Linear`` inside, so it drops in
anywhere, and later steps (quantize) see and can swap the two small linears.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from miaotui.compress.recipe import Context, RecipeError
from miaotui.models.base import dense_linears


class FactorizedLinear(nn.Module):
    """y = b(a(x)): ``a`` (r × in, no bias), ``b`` (out × r, with the original bias)."""

    kind = "lowrank"

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.a = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.b = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(cls, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> "FactorizedLinear":
        """From A (r, in), B (out, r) and an optional bias (out,)."""
        m = cls(a.shape[1], b.shape[0], a.shape[0], bias is not None, device=a.device, dtype=a.dtype)
        with torch.no_grad():
            m.a.weight.copy_(a)
            m.b.weight.copy_(b)
            if bias is not None:
                m.b.bias.copy_(bias)
        return m.requires_grad_(False)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.b.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))

    def dense_weight(self) -> torch.Tensor:
        """B·A (out, in): the weight this module stands for."""
        return self.b.weight @ self.a.weight

    def spec(self) -> dict[str, Any]:
        """What the checkpoint manifest records so ``load()`` can rebuild the module (``swap.build_module``)."""
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "rank": self.rank, "bias": self.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "FactorizedLinear":
        return cls(spec["in_features"], spec["out_features"], spec["rank"], bias=spec["bias"])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


# ---- the decomposition


def whitening_factor(gram: torch.Tensor, damp: float = 1e-4) -> torch.Tensor:
    """Lower-triangular S with S·Sᵀ = XᵀX (+ ``damp`` × mean diagonal on the diagonal, more if needed so
    that the Cholesky succeeds: a dead input channel makes XᵀX singular). fp64."""
    h = gram.double()
    mean_diag = h.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for d in (damp, damp * 10, damp * 100, 1e-1):
        s, info = torch.linalg.cholesky_ex(h + d * mean_diag * eye)
        if info == 0:
            return s
    raise RecipeError("lowrank: the calibration Gram matrix is not positive definite even with damping")


def spectrum(w: torch.Tensor, whiten: torch.Tensor | None = None):
    """SVD of W (or of W·S with ``whiten`` = S) in fp64: (U, σ, Vᵀ)."""
    m = w.double() if whiten is None else w.double() @ whiten
    return torch.linalg.svd(m, full_matrices=False)


def factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int,
            whiten: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, in), B (out, r) from a (whitened) SVD truncated to ``rank``, fp64."""
    root = s[:rank].sqrt()
    b = u[:, :rank] * root
    a = root[:, None] * vh[:rank]
    if whiten is not None:  # A·S⁻¹ by a triangular solve (X·S = A)
        a = torch.linalg.solve_triangular(whiten, a, upper=False, left=False)
    return a, b


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def choose_rank(s: torch.Tensor, in_features: int, out_features: int, *, ratio: float | None = None,
                energy: float | None = None, rank: int | None = None, multiple_of: int = 8) -> int:
    """The rank a linear gets (at most min(in, out)).

    ratio: the largest multiple of ``multiple_of`` with r·(in + out) ≤ ratio·in·out (at least ``multiple_of``).
    energy: the smallest r with Σ_{i<r} σ_i² ≥ energy · Σ σ², rounded up to a multiple.
    rank: that rank.
    """
    full = min(in_features, out_features)
    if ratio is not None:
        r = math.floor(ratio * in_features * out_features / (in_features + out_features))
        r = max(multiple_of, r // multiple_of * multiple_of)
    elif energy is not None:
        cum = torch.cumsum(s.double() ** 2, 0)
        r = int(torch.searchsorted(cum, energy * cum[-1] * (1 - 1e-12))) + 1
        r = _round_up(r, multiple_of)
    else:
        r = rank
    return min(r, full)


def saves_params(rank: int, in_features: int, out_features: int) -> bool:
    return rank * (in_features + out_features) < in_features * out_features


# ---- over a model


def _targets(layer: nn.Module, wanted: list[str] | None) -> dict[str, nn.Linear]:
    """The layer's dense linears (relative names) that ``wanted`` suffixes name (all of them when None)."""
    linears = dense_linears(layer)
    if wanted is None:
        return linears
    picked = {n: m for n, m in linears.items() if any(n == t or n.endswith("." + t) for t in wanted)}
    short = sorted({n.rsplit(".", 1)[-1] for n in linears})
    unmatched = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in linears)]
    if unmatched:
        raise RecipeError(f"lowrank: targets {unmatched} match no dense linear of a layer (there are: "
                          f"{', '.join(short)}; fused models have qkv_proj and gate_up_proj)")
    return picked


@torch.no_grad()
def factorize_linear(lin: nn.Linear, gram: torch.Tensor | None = None, damp: float = 1e-4,
                     **rank_args: Any) -> tuple[FactorizedLinear | None, int]:
    """(the factorised module, or None when the rank saves no parameters; the rank chosen).
    ``gram``: XᵀX of the linear's inputs (whitened SVD), or None (plain SVD)."""
    w = lin.weight.detach()
    whiten = whitening_factor(gram, damp) if gram is not None else None
    u, s, vh = spectrum(w, whiten)
    r = choose_rank(s, lin.in_features, lin.out_features, **rank_args)
    if not saves_params(r, lin.in_features, lin.out_features):
        return None, r
    a, b = factors(u, s, vh, r, whiten)
    bias = lin.bias.detach() if lin.bias is not None else None
    return FactorizedLinear.from_factors(a.to(w.dtype), b.to(w.dtype), bias), r


def lowrank_model(model: nn.Module, ids: torch.Tensor | None, targets: list[str] | None = None, whiten: bool = True,
                  damp: float = 1e-4, progress: bool = True, **rank_args: Any) -> dict[str, dict[str, Any]]:
    """Factorise the decoder layers' dense linears in place, layer by layer (with ``whiten``, each layer's
    Gram matrices come from inputs that went through the factorised layers before it). Returns
    ``{qualified name: {"rank", "in", "out", "factorized"}}``."""
    from miaotui.compress.layerwise import HessianStat, layer_by_layer, layer_stack
    from miaotui.compress.quant.swap import set_module

    out: dict[str, dict[str, Any]] = {}

    def swap(layer: nn.Module, prefix: str, name: str, lin: nn.Linear, gram: torch.Tensor | None) -> None:
        new, r = factorize_linear(lin, gram, damp, **rank_args)
        out[f"{prefix}.{name}"] = {"rank": r, "in": lin.in_features, "out": lin.out_features,
                                   "factorized": new is not None}
        if new is not None:
            set_module(layer, name, new)

    if not whiten:
        from tqdm import tqdm

        stack = layer_stack(model)
        for i, layer in enumerate(tqdm(stack.layers, desc="lowrank", unit="layer", disable=not progress)):
            for name, lin in _targets(layer, targets).items():
                swap(layer, f"{stack.prefix}.{i}", name, lin, None)
        return out
    if ids is None:
        raise ValueError("whitened low-rank needs calibration ids")
    for calib in layer_by_layer(model, ids, progress=progress, desc="lowrank"):
        layer = calib.layer
        lins = _targets(layer, targets)
        stats = calib.capture({n: HessianStat(lin.in_features) for n, lin in lins.items()})
        for name, lin in lins.items():
            swap(layer, calib.name_prefix, name, lin, stats[name].h)
        calib.advance()  # the next layer sees this factorised layer's outputs
    return out


def run_lowrank(ctx: Context, params: dict[str, Any]) -> dict[str, Any]:
    """Recipe step ``lowrank: {ratio: 0.5} | {energy: 0.95} | {rank: 64}, whiten: true, targets: [...],
    multiple_of: 8, damp: 1e-4``."""
    allowed = {"ratio", "energy", "rank", "whiten", "targets", "multiple_of", "damp"}
    unknown = set(params) - allowed
    if unknown:
        raise RecipeError(f"lowrank: unknown parameter(s) {', '.join(sorted(unknown))} "
                          f"(allowed: {', '.join(sorted(allowed))})")
    given = [k for k in ("ratio", "energy", "rank") if params.get(k) is not None]
    if len(given) != 1:
        raise RecipeError("lowrank: give exactly one of ratio (params kept), energy (spectrum kept) or rank")
    key, value = given[0], params[given[0]]
    if key == "rank":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RecipeError(f"lowrank: rank must be a positive integer, got {value!r}")
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise RecipeError(f"lowrank: {key} must be a number in (0, 1], got {value!r}")
    multiple = params.get("multiple_of", 8)
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise RecipeError(f"lowrank: multiple_of must be a positive integer, got {multiple!r}")
    whiten = params.get("whiten", True)
    if not isinstance(whiten, bool):
        raise RecipeError(f"lowrank: whiten must be true or false, got {whiten!r}")
    damp = params.get("damp", 1e-4)
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or damp < 0:
        raise RecipeError(f"lowrank: damp must be a non-negative number, got {damp!r}")
    targets = params.get("targets")
    if targets is not None and (not isinstance(targets, list) or not all(isinstance(t, str) for t in targets)
                                or not targets):
        raise RecipeError(f"lowrank: targets must be a non-empty list of linear names, got {targets!r}")
    model = ctx.loaded.model
    from miaotui.compress.layerwise import layer_stack

    _targets(layer_stack(model).layers[0], targets)  # a bad target fails before calibration is paid for
    before = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    ids = ctx.calib_ids() if whiten else None
    layers = lowrank_model(model, ids, targets, whiten, float(damp), ctx.progress,
                           **{key: value, "multiple_of": multiple})
    for name, info in layers.items():
        if info["factorized"]:
            ctx.modules[name] = model.get_submodule(name).spec()
    after = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    if not any(info["factorized"] for info in layers.values()):
        raise RecipeError(f"lowrank: no linear saves parameters at {key}={value} (every rank is too high)")
    return {"whiten": whiten, "ranks": {n: i["rank"] for n, i in layers.items() if i["factorized"]},
            "kept_dense": [n for n, i in layers.items() if not i["factorized"]],
            "params": [before, after]}
