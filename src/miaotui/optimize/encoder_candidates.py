"""Which recipes an encoder search tries, in which order. Like ``candidates.propose`` for decoders, a
generator that reads each outcome (``state.outcome``) before choosing the next:

1. the source itself (fp32: the speed baseline) and the source in bf16 (``dtype``: on CPUs without native
   bf16 its matmuls run in fp32, so it saves memory, not time — measured, not assumed);
2. weight-only int8 (and int4 for the memory objective) and W8A8 (SmoothQuant-folded int8 activations
   and 7-bit weight codes, the kernels that make an encoder faster on a CPU);
3. W8A8 with the k layers most sensitive to it kept float (``encoder_sensitivity.py``), k found by
   bisection between a failing W8A8 and the passing float model;
4. structured pruning: attention heads (a quarter, then half of each layer's), then layers dropped (the k
   least sensitive ones, k = 1, 2, ... until one misses the budget), each alone and under the fastest
   in-budget quantization; each step's candidate is the next one's ``parent`` (under a quantization, the
   same cut in float is), so after a miss the stronger ones are skipped unbuilt. A float candidate is also
   tried in bf16 when bf16 measured faster;
5. distillation (slow on a CPU: the time limit skips it first): the layer-dropped candidate that missed the
   budget by least, healed against the source on ``--calib`` text (never the evaluation paragraphs),
   then quantized like the base.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from miaotui.optimize.candidates import Candidate, _bisect, step_available

DISTILL_STEPS = 60  # a short heal: enough to recover most of a dropped layer's cosine on MiniLM-sized models


@dataclass
class EncoderCandidate(Candidate):
    dtype: str = "fp32"  # the float weights' dtype after the steps ("bf16": a dtype candidate)


@dataclass(frozen=True)
class EncoderShape:
    n_layers: int
    n_heads: int


class EncoderSearchState(Protocol):
    families: tuple[str, ...]
    objective: str
    distill_data: str | None  # text to distil on, disjoint from the evaluation splits (None: no distillation)

    def outcome(self, c: Candidate) -> str | None: ...

    def loss(self, name: str) -> float | None: ...

    def record(self, name: str) -> dict | None: ...

    def fastest_passing(self, quantized_only: bool = False) -> Candidate | None: ...

    def sensitivity(self, kind: str): ...


W8A8 = [{"quantize": {"method": "smoothquant", "alpha": 0.5}}]


def w8a8_float_layers(layers: list[int]) -> list[dict]:
    """W8A8 with ``layers`` left float (the encoder quantize step's ``skip`` overrides)."""
    overrides = {f"layers.{i}.*": {"skip": True} for i in sorted(layers)}
    return [{"quantize": {**W8A8[0]["quantize"], "overrides": overrides}}] if layers else W8A8


def after_dropping(steps: list[dict], dropped: list[int]) -> list[dict]:
    """``steps`` (a quantize step whose overrides name layers by index) renumbered for a stack without the
    layers ``dropped``: layer i becomes i − (dropped layers below it); overrides of dropped layers vanish."""
    out = []
    for step in steps:
        (kind, params), = step.items()
        if kind == "quantize" and params.get("overrides"):
            overrides = {}
            for glob, settings in params["overrides"].items():
                i = int(glob.split(".")[1])
                if i not in dropped:
                    overrides[f"layers.{i - sum(d < i for d in dropped)}.*"] = settings
            params = {k: v for k, v in params.items() if k != "overrides"}
            if overrides:
                params["overrides"] = overrides
        out.append({kind: params})
    return out


def _faster(state: EncoderSearchState, a: str, b: str) -> bool:
    """Candidate ``a`` measured faster (by the objective) than ``b``."""
    ra, rb = state.record(a), state.record(b)
    if ra is None or rb is None:
        return False
    higher = state.objective == "throughput"
    return ra["speed"]["value"] > rb["speed"]["value"] if higher else ra["speed"]["value"] < rb["speed"]["value"]


def propose_encoder(state: EncoderSearchState, shape: EncoderShape) -> Iterator[EncoderCandidate]:
    """Every candidate of an encoder search, in order (see the module docstring)."""
    fam = set(state.families)
    source = EncoderCandidate("source", [], "baseline", note="the source encoder, unchanged (fp32): the baseline")
    yield source
    bf16 = EncoderCandidate("bf16", [], "dtype", note="the source with bf16 weights (load with --dtype bf16)",
                            dtype="bf16")
    if "dtype" in fam:
        yield bf16
    if "uniform" in fam:
        yield EncoderCandidate("int8", [{"quantize": {"method": "rtn", "bits": 8}}], "uniform",
                               note="int8 weights per channel, float activations")
        if state.objective == "memory":  # weight-only int4 computes in float: only ever smaller, not faster
            yield EncoderCandidate("int4-rtn", [{"quantize": {"method": "rtn", "bits": 4, "group_size": 32}}],
                                   "uniform", note="int4 weights, group 32, float activations")
    w8a8 = EncoderCandidate("w8a8", W8A8, "calibrated", note="int8 activations and weights (SmoothQuant, alpha 0.5)")
    if "calibrated" in fam:
        yield w8a8
    if "mixed" in fam and state.outcome(w8a8) == "fail" and shape.n_layers > 1:
        sens = state.sensitivity("w8a8")
        if sens is not None:
            def make(k: int) -> EncoderCandidate:
                layers = sens.most_sensitive(k)
                return EncoderCandidate(f"w8a8-float{k}", w8a8_float_layers(layers), "mixed",
                                        note=f"W8A8 with the {k} layer(s) most sensitive to it kept float: {layers}")
            yield from _bisect(state, make, 0, shape.n_layers)
    bf16_faster = state.outcome(bf16) == "pass" and _faster(state, "bf16", "source")
    yield from _pruned(state, shape, fam, bf16_faster)


def _bases(state: EncoderSearchState) -> list[EncoderCandidate | None]:
    """What pruning is tried under: nothing (float), then the fastest in-budget quantization, if any."""
    best = state.fastest_passing(quantized_only=True)
    if best is None or not best.steps:
        return [None]
    return [None, best]


def _pruned(state: EncoderSearchState, shape: EncoderShape, fam: set[str],
            bf16_faster: bool) -> Iterator[EncoderCandidate]:
    if "prune" not in fam:
        return
    chains: list[list[tuple[dict, str, list[int]]]] = []  # (step, note, layers it drops) ever stronger
    if step_available("prune-heads") and shape.n_heads > 1:
        counts = sorted({max(1, shape.n_heads // 4), max(1, shape.n_heads // 2)} - {shape.n_heads})
        chains.append([({"prune-heads": {"heads": k}}, f"{k} of {shape.n_heads} heads per layer removed", [])
                       for k in counts])
    drop_chain: list[tuple[dict, str, list[int]]] = []
    if step_available("prune-layers") and shape.n_layers > 1:
        sens = state.sensitivity("drop")
        for k in range(1, shape.n_layers):
            if sens is not None:
                layers = sens.least_sensitive(k)
                drop_chain.append(({"prune-layers": {"layers": layers}},
                                   f"{k} of {shape.n_layers} layers dropped, the least sensitive: {layers}", layers))
            else:  # no time for the sensitivity: the step scores layers itself on calibration text
                drop_chain.append(({"prune-layers": {"count": k}}, f"{k} of {shape.n_layers} layers dropped "
                                   "(by block influence on calibration text)", []))
        chains.append(drop_chain)
    closest: list[tuple[float, EncoderCandidate, tuple[dict, str, list[int]], EncoderCandidate | None]] = []
    for base in _bases(state):
        for chain in chains:
            parent: str | None = None
            for item in chain:
                step, note, dropped = item
                (kind, params), = step.items()
                tag = f"{kind}-{_tag(params)}"
                name, steps = tag, [step]
                if base is not None:
                    name, steps = f"{tag}+{base.name}", [step] + after_dropping(base.steps, dropped)
                    note_full = f"{note}, then {base.name}"
                    parent = tag  # quantizing adds error: if the float cut already misses, so will this
                else:
                    note_full = note
                c = EncoderCandidate(name, steps, "prune", parent=parent, note=note_full)
                yield c
                if state.outcome(c) == "fail" and state.loss(c.name) is not None and kind == "prune-layers":
                    closest.append((state.loss(c.name), c, item, base))
                if base is None and bf16_faster and state.outcome(c) == "pass":
                    yield EncoderCandidate(f"{name}+bf16", steps, "prune", parent=name, note=f"{note_full}, bf16",
                                           dtype="bf16")
                if state.outcome(c) != "pass":
                    break
                parent = c.name
    # distillation heals a dropped layer: the layer-dropped candidate that missed the budget by least
    if "distill" in fam and closest and state.distill_data is not None and step_available("distill"):
        _, c, (step, note, dropped), base = min(closest, key=lambda t: t[0])
        distill = {"distill": {"steps": DISTILL_STEPS, "data": state.distill_data}}
        steps = [step, distill] + (after_dropping(base.steps, dropped) if base is not None else [])
        tag = f"{next(iter(step))}-{_tag(next(iter(step.values())))}"
        yield EncoderCandidate(f"{tag}+distill" + (f"+{base.name}" if base is not None else ""), steps, "distill",
                               note=f"{note}; healed by distillation from the source ({DISTILL_STEPS} steps)"
                                    + (f", then {base.name}" if base is not None else ""))


def _tag(params: dict[str, Any]) -> str:
    return "-".join(f"{k}{len(v) if isinstance(v, list) else v}" for k, v in params.items())
