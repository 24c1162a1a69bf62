"""The runoff: the near-best candidates within budget timed again, head to head, before the choice.

During the search each candidate is timed once, minutes apart from the others, on a machine whose speed
drifts (this 2-core VM: the same int4 format measured 127 and 158 tok/s in one search). So before choosing,
the candidates within ``MARGIN`` of the fastest one within budget (at most ``MAX_CONTENDERS``) are built
side by side and timed in turns, ``ROUNDS`` rounds with the order rotated each round; the median of each
decides. Bytes (the memory objective) are exact and need no runoff.
"""

from __future__ import annotations

import os
import statistics
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from miaotui.optimize.loop import Entry, SearchLoop

MARGIN = 0.25  # contenders: within 25 % of the fastest within budget
MAX_CONTENDERS = 3
ROUNDS = 5  # one timing of the same model here ranged 97-156 tok/s within a minute
MEMORY_SHARE = 0.5  # the contenders together may take at most half of the available memory


def _available_memory() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def contenders(loop: SearchLoop, passing: list[Entry]) -> list[Entry]:
    """The entries of ``passing`` (best first) close enough to the best to be re-timed."""
    higher = loop.objectives[loop.cfg.objective][2]
    if loop.cfg.objective == "memory" or len(passing) < 2:
        return []
    best = passing[0].record["speed"]["value"]

    def ratio(e: Entry) -> float:
        v = e.record["speed"]["value"]
        return v / best if higher else best / max(v, 1e-12)

    close = [e for e in passing[:MAX_CONTENDERS] if ratio(e) >= 1 - MARGIN]
    return close if len(close) >= 2 else []


def run_runoff(loop: SearchLoop, passing: list[Entry]) -> tuple[list[Entry], dict[str, Any] | None]:
    """``passing`` reordered by the runoff's medians (the rest unchanged) and the runoff's record for the
    report (None when there was nothing to decide)."""
    close = contenders(loop, passing)
    if not close:
        return passing, None
    names = [e.candidate.name for e in close]
    kept = loop.kept[0] if loop.kept is not None else None
    cost = sum(ROUNDS * e.record.get("speed_s", 0.0)
               + (0.0 if e.candidate.name == kept else e.record.get("build_s", 0.0)) for e in close)
    if loop.elapsed() + cost + loop.reserve() > loop.cfg.time_limit:
        return passing, _skipped(loop, names, f"needs ~{cost:.0f} s, {max(loop.left(), 0):.0f} s left")
    avail = _available_memory()
    need = sum(e.record["bytes"] for e in close)
    if avail is not None and need > MEMORY_SHARE * avail:
        return passing, _skipped(loop, names, f"{need / 1e9:.1f} GB of contenders, {avail / 1e9:.1f} GB free")
    loop.say(f"runoff: {', '.join(names)} timed again in turns ({ROUNDS} rounds)")
    built = {}
    for e in close:
        b = loop.rebuild(e.candidate)
        if b is None:
            return passing, _skipped(loop, names, f"{e.candidate.name} could not be rebuilt")
        built[e.candidate.name] = b
    values: dict[str, list[float]] = {n: [] for n in names}
    for r in range(ROUNDS):
        for i in range(len(close)):
            e = close[(i + r) % len(close)]
            values[e.candidate.name].append(loop.time_speed(e.candidate, built[e.candidate.name]))
    higher = loop.objectives[loop.cfg.objective][2]
    median = {n: statistics.median(v) for n, v in values.items()}
    ranked = sorted(close, key=lambda e: -median[e.candidate.name] if higher else median[e.candidate.name])
    winner = ranked[0].candidate.name
    loop.kept = (winner, built[winner])  # written without a rebuild; the others are dropped here
    unit = loop.objectives[loop.cfg.objective][1]
    loop.say("runoff: " + ", ".join(f"{n} {median[n]:.3g} {unit}" for n in (e.candidate.name for e in ranked))
             + f" (medians) → {winner}")
    rest = [e for e in passing if e not in close]
    record = {"rounds": ROUNDS, "margin": MARGIN, "unit": unit, "winner": winner,
              "candidates": [{"name": n, "values": [round(v, 4) for v in values[n]], "median": round(median[n], 4)}
                             for n in (e.candidate.name for e in ranked)]}
    return ranked + rest, record


def _skipped(loop: SearchLoop, names: list[str], why: str) -> dict[str, Any]:
    loop.say(f"runoff between {', '.join(names)} skipped: {why}")
    return {"skipped": why, "candidates": [{"name": n} for n in names]}
