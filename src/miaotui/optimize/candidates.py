"""Which recipes the search tries, in which order, and which it can rule out before building them.

``propose(state)`` is a generator: it yields one ``Candidate``, the search measures it (or skips it), and the
generator reads the outcome (``state.outcome``) before choosing the next, so later candidates depend on
earlier results. The order is cheap and promising first:

1. the source itself (the speed baseline; it meets any relative budget);
2. uniform round-to-nearest: int4 at group 128, 64, 32, then int8 (seconds to build);
3. mixed precision: int4 with the k most sensitive layers (``sensitivity.py``) at int8, k found by bisection
   between a failing int4 and a passing int8 — quality grows and speed falls with k, so the smallest
   passing k is the fastest mixed recipe;
4. calibrated int4 (AWQ, GPTQ; minutes to build) and W8A8 SmoothQuant, then mixed precision on the best
   calibrated base;
5. structured pruning (MLP channels, heads, the least sensitive layers) on top of the fastest recipe that
   already meets the budget, then healed by distillation — each offered only when its step imports.

Ruled out before building (``cannot_win``): a candidate whose runtime formats are those of a measured
in-budget candidate and whose weights are at least as large — same kernels, more bytes: it cannot be faster
— and a candidate that compresses further than a ``parent`` that already failed the budget.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from miaotui.compress.quant.mixed import module_settings
from miaotui.compress.quant.qtensor import check_group
from miaotui.compress.recipe import BUILTIN, STEPS, quant_overrides


@dataclass
class Candidate:
    name: str
    steps: list[dict]
    family: str  # "baseline", "uniform", "groups", "mixed", "calibrated", "prune", "lowrank", "distill"
    parent: str | None = None  # a less compressed candidate: if it fails the budget, so will this one
    note: str = ""

    @property
    def recipe(self) -> dict[str, Any]:
        return {"name": self.name, "steps": self.steps}

    def step_kinds(self) -> list[str]:
        """``["quantize/rtn", "prune-channels", ...]``: what the cost model times separately."""
        out = []
        for step in self.steps:
            (kind, params), = step.items()
            out.append(f"quantize/{(params or {}).get('method', 'rtn')}" if kind == "quantize" else kind)
        return out


class SearchState(Protocol):
    """What the generator may ask of the search (``search.py`` implements it)."""

    families: tuple[str, ...]

    def outcome(self, c: Candidate) -> str | None:
        """"pass", "fail", "error", "skipped-time", "skipped-dominated" or None (not reached)."""

    def loss(self, name: str) -> float | None:
        """The measured primary quality loss of a candidate (lower is better), None if not measured."""

    def fastest_passing(self, quantized_only: bool = False) -> Candidate | None: ...

    def sensitivity(self, kind: str): ...  # Sensitivity | None (None: not affordable now)


def step_available(kind: str) -> bool:
    """Whether a recipe step's module imports and defines its function (others may be mid-development)."""
    module, _, func = STEPS.get(kind, ":").partition(":")
    try:
        return callable(getattr(importlib.import_module(module), func, None))
    except Exception:  # an absent or broken module: the step is simply not offered
        return False


# ---- what a quantize-only recipe will weigh, before building it


@dataclass
class ModelShape:
    """The source's decoder linears and sizes, for estimating a recipe's bytes and runtime formats."""

    prefix: str
    n_layers: int
    linears: dict[str, tuple[int, int]]  # qualified name → (out, in)
    total_bytes: int  # the source's stored bytes (fp32)
    head: tuple[int, int] | None  # an nn.Linear head's (out, in)
    tied: bool

    @classmethod
    def of(cls, model) -> "ModelShape":
        from torch import nn

        from miaotui.compress.layerwise import layer_stack
        from miaotui.compress.quant.swap import layer_linears, tied_embedding_name
        from miaotui.optimize.measure import stored_bytes

        stack = layer_stack(model)
        lins = {n: tuple(m.weight.shape) for n, m in layer_linears(model).items()}
        head = model.lm_head
        return cls(stack.prefix, len(stack.layers), lins, stored_bytes(model),
                   tuple(head.weight.shape) if type(head) is nn.Linear else None,
                   tied_embedding_name(model) is not None)


def _quant_bytes(out_f: int, in_f: int, bits: int, group: int | None) -> int:
    g = check_group(in_f, group)
    if bits == 8:  # int8 codes + an fp32 scale per row or per group
        return out_f * in_f + 4 * out_f * (in_f // g)
    return out_f * in_f // 2 + 4 * out_f * (in_f // g)  # packed codes + fp16 scale and zero per group


def estimate(shape: ModelShape, steps: list[dict]) -> tuple[int, frozenset[str]] | None:
    """(stored bytes, runtime formats of the decoder linears) of a quantize-only recipe; None for anything
    else (pruning changes shapes, so only a measurement knows)."""
    if not steps:
        return shape.total_bytes, frozenset({"dense"})
    if len(steps) != 1 or "quantize" not in steps[0]:
        return None
    p = dict(steps[0]["quantize"] or {})
    method = p.get("method", "rtn")
    bits = p.get("bits", 8 if method == "smoothquant" else 4)
    overrides = quant_overrides(method, p)  # the per-module formats the step will build (int8 groups)
    base = {"bits": bits, "group_size": p.get("group_size", None if bits == 8 else 128)}
    total, kinds = shape.total_bytes, set()
    for name, (out_f, in_f) in shape.linears.items():
        s = module_settings(name, base, overrides)
        if s is None:
            kinds.add("dense")
            continue
        total += _quant_bytes(out_f, in_f, s["bits"], s.get("group_size")) - 4 * out_f * in_f
        kinds.add("w8a8" if method == "smoothquant" else f"int{s['bits']}")
    if shape.head is not None and p.get("head", "int8") == "int8":
        out_f, in_f = shape.head
        total += _quant_bytes(out_f, in_f, 8, p.get("head_group_size")) - 4 * out_f * in_f
    return total, frozenset(kinds)


# ---- the candidates


def _quant(method: str, **params: Any) -> list[dict]:
    return [{"quantize": {"method": method, **params}}]


def _builtin(name: str) -> list[dict]:
    return [dict(s) for s in BUILTIN[name]]


def mixed_steps(base_steps: list[dict], prefix: str, layers: list[int]) -> list[dict]:
    """``base_steps`` (one int4 quantize step) with ``layers`` at int8 through per-layer overrides."""
    (kind, params), = base_steps[0].items()
    overrides = {f"{prefix}.{i}.*": {"bits": 8} for i in sorted(layers)}
    return [{kind: {**params, "overrides": overrides}}] if layers else base_steps


def _bisect(state: SearchState, make, lo: int, hi: int) -> Iterator[Candidate]:
    """Smallest k in (lo, hi] whose candidate passes, assuming quality grows with k (lo fails, hi passes).
    A probe that cannot win (larger than an in-budget candidate) moves ``hi`` down: larger k cannot win
    either. A probe skipped for time, or that failed to build, ends the bisection."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        c = make(mid)
        yield c
        outcome = state.outcome(c)
        if outcome in ("pass", "skipped-dominated"):
            hi = mid
        elif outcome == "fail":
            lo = mid
        else:
            return


def propose(state: SearchState, shape: ModelShape) -> Iterator[Candidate]:
    """Every candidate of the search, in order (see the module docstring)."""
    fam = set(state.families)
    yield Candidate("source", [], "baseline", note="the source model, unchanged (fp32): the speed baseline")
    if "uniform" in fam:
        yield Candidate("int4-rtn", _builtin("int4-rtn"), "uniform", note="int4 RTN, group 128")
    if "groups" in fam:
        yield Candidate("int4-rtn-g64", _quant("rtn", bits=4, group_size=64), "groups", note="int4 RTN, group 64")
        yield Candidate("int4-g32", _builtin("int4-g32"), "groups",
                        note="int4 RTN, group 32, float zero point (re-finds GGUF Q4_1 weights)")
    # RTN (seconds to build), not the built-in int8 recipe (GPTQ, group-wise: minutes of calibration)
    int8_rtn = Candidate("int8", _quant("rtn", bits=8, group_size=None, symmetric=True), "uniform",
                         note="int8 RTN per channel")
    if "uniform" in fam:
        yield int8_rtn
    n = shape.n_layers

    def mixed_family(base: Candidate, hi: int) -> Iterator[Candidate]:
        if "mixed" not in fam or state.outcome(base) != "fail" or hi <= 1:
            return
        sens = state.sensitivity("quant")
        if sens is None:
            return

        def make(k: int) -> Candidate:
            layers = sens.most_sensitive(k)
            return Candidate(f"{base.name}+int8x{k}", mixed_steps(base.steps, shape.prefix, layers), "mixed",
                             note=f"{base.name} with the {k} most sensitive layers at int8: {layers}")
        yield from _bisect(state, make, 0, hi)

    # mixed precision needs both ends measured: int4 failing, int8 passing
    int4_rtn = Candidate("int4-rtn", _builtin("int4-rtn"), "uniform")
    if state.outcome(int8_rtn) == "pass":
        yield from mixed_family(int4_rtn, n)

    if "calibrated" in fam:
        calibrated = [Candidate("int4-awq", _builtin("int4-awq"), "calibrated", note="int4 AWQ, group 128"),
                      Candidate("int4-gptq", _builtin("int4-gptq"), "calibrated",
                                note="int4 GPTQ, group 128, act-order")]
        yield from calibrated
        yield Candidate("w8a8-smoothquant", _builtin("w8a8-smoothquant"), "calibrated",
                        note="int8 weights and activations (SmoothQuant)")
        # mixed precision on the calibrated int4 base that lost least, if it beat RTN and still fails alone
        failed = [(state.loss(c.name), c) for c in calibrated if state.outcome(c) == "fail"]
        failed = [(loss, c) for loss, c in failed if loss is not None]
        rtn_loss = state.loss("int4-rtn")
        if failed:
            loss, best = min(failed, key=lambda t: t[0])
            if rtn_loss is None or loss < rtn_loss:
                yield from mixed_family(best, n)
        for c in calibrated:
            if state.outcome(c) == "fail":
                method = c.name.split("-")[1]
                params = dict(BUILTIN[c.name][0]["quantize"], group_size=64)
                yield Candidate(f"{c.name}-g64", [{"quantize": params}], "calibrated",
                                note=f"int4 {method.upper()}, group 64")

    yield from _pruned(state, shape, fam)


def _pruned(state: SearchState, shape: ModelShape, fam: set[str]) -> Iterator[Candidate]:
    """Structured pruning and low-rank factorisation on top of the fastest in-budget quantized recipe, each
    in ever stronger steps until one misses the budget; then the closest miss healed by distillation."""
    if "prune" not in fam and "lowrank" not in fam:
        return
    base = state.fastest_passing(quantized_only=True)
    if base is None:
        return
    chains: list[list[tuple[str, dict, str]]] = []  # each list: ever more pruning, each the next's parent
    if "prune" in fam and step_available("prune-channels"):
        chains.append([("prune-channels", {"fraction": f}, f"{int(f * 100)}% of MLP channels removed")
                       for f in (0.0625, 0.125, 0.25)])
    if "prune" in fam and step_available("prune-layers"):
        sens = state.sensitivity("drop")
        if sens is not None:
            chains.append([("prune-layers", {"layers": sens.least_sensitive(k)},
                            f"the {k} least sensitive layers dropped: {sens.least_sensitive(k)}")
                           for k in (1, 2, 4) if k < shape.n_layers])
    if "prune" in fam and step_available("prune-heads"):
        chains.append([("prune-heads", {"heads_per_group": 1}, "one query head per KV group removed")])
    if "lowrank" in fam and step_available("lowrank"):
        chains.append([("lowrank", {"ratio": r}, f"every linear factorised to {int(r * 100)}% of its parameters "
                        "(activation-aware SVD)") for r in (0.9, 0.75, 0.5)])
    failed_close: list[tuple[float, Candidate]] = []
    for chain in chains:
        parent = base.name
        for kind, params, note in chain:
            tag = "-".join(f"{k}{v if not isinstance(v, list) else len(v)}" for k, v in params.items())
            family = "lowrank" if kind == "lowrank" else "prune"
            c = Candidate(f"{kind}-{tag}+{base.name}", [{kind: params}] + base.steps, family, parent=parent,
                          note=f"{note}, then {base.name}")
            yield c
            if state.outcome(c) == "fail" and state.loss(c.name) is not None:
                failed_close.append((state.loss(c.name), c))
            if state.outcome(c) != "pass":
                break
            parent = c.name
    # distillation heals pruning: try it on the pruned candidate that missed the budget by the least
    if "distill" in fam and failed_close and step_available("distill"):
        _, c = min(failed_close, key=lambda t: t[0])
        prune_step = c.steps[0]
        yield Candidate(f"{c.name.split('+')[0]}+distill+{base.name}",
                        [prune_step, {"distill": {"steps": 50}}] + base.steps, "distill",
                        note=f"{c.note}; healed by distillation from the source before quantizing")


def unstructured_note() -> dict[str, str] | None:
    """Why unstructured / N:M sparsity is not searched: its masks live in dense weights, which run at dense
    speed here, so a sparse recipe is never faster than the same recipe without it — only worse."""
    if not step_available("prune"):
        return None
    return {"name": "prune (unstructured, N:M)", "reason": "stored dense (no sparse kernel on this CPU): "
            "the same speed as without it and lower quality, so it cannot win"}
