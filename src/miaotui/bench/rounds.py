"""Engines measured in alternation: ``--rounds N`` runs the whole engine list N times, each round in a
rotated order, and keeps each figure's median over the rounds.

On a shared machine the memory bandwidth moves by a third between minutes (other tenants), and a
memory-bound decode moves with it. Run back to back, the engine measured in a slow minute loses a
comparison it would win in the next one; in alternation every engine sees the same spread of minutes,
so the ratios between them hold still even when the absolute figures do not.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable


def rotated(specs: list[str], round_index: int) -> list[str]:
    """Round r starts at engine r: ``rotated([a, b, c], 1) == [b, c, a]``."""
    if not specs:
        return []
    k = round_index % len(specs)
    return specs[k:] + specs[:k]


def merge(runs: list[dict]) -> dict:
    """One engine's per-round results → one result: measured (float) figures become their median over the
    rounds, peak RSS its maximum, nested dicts are merged key by key, anything else is the first round's.
    ``rounds`` keeps the per-round decode, prefill and throughput figures, so the spread is on record."""
    out = _merge_values(runs)
    if len(runs) > 1:
        out["rounds"] = [{k: r[k] for k in ("decode_tok_s", "prefill_tok_s", "throughput_tok_s") if k in r}
                         for r in runs]
    return out


def _merge_values(values: list, key: str = "") -> object:
    first = values[0]
    if isinstance(first, dict):
        keys = [k for k in first if all(isinstance(v, dict) and k in v for v in values)]
        return {k: _merge_values([v[k] for v in values], k) for k in keys}
    if key == "peak_rss_bytes":
        return max(values)
    if isinstance(first, float) and all(isinstance(v, (int, float)) for v in values):
        return statistics.median(values)  # measurements; ints are settings and counts, the same every round
    return first


def run_rounds(specs: list[str], rounds: int, run_one: Callable[[str], dict | None],
               log: Callable[[str], None] = lambda s: None) -> list[dict]:
    """Each engine's merged result, in ``specs`` order; an engine that fails in any round is left out."""
    per_engine: dict[str, list[dict]] = {s: [] for s in specs}
    failed: set[str] = set()
    for r in range(rounds):
        for spec in rotated(specs, r):
            if spec in failed:
                continue
            log(f"{spec} ..." if rounds == 1 else f"round {r + 1}/{rounds}: {spec} ...")
            result = run_one(spec)
            if result is None:
                failed.add(spec)
            else:
                per_engine[spec].append(result)
    return [merge(per_engine[s]) for s in specs if s not in failed and per_engine[s]]
