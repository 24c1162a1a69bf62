"""The Pareto frontier of candidates: none of them is both slower and worse than another.

Points are ``(loss, speed)``: lower loss is better quality (perplexity, KLD; a "higher is better" measure
such as top-1 agreement is negated by the caller), higher speed is better (tok/s; for the memory
objective, negative bytes).
"""

from __future__ import annotations

from collections.abc import Sequence


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """``a`` is at least as good as ``b`` on both axes and strictly better on one."""
    return a[0] <= b[0] and a[1] >= b[1] and (a[0] < b[0] or a[1] > b[1])


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points, sorted by speed (fastest first). Identical points are all kept:
    neither dominates the other. O(n²), for the few dozen candidates of a search."""
    keep = [i for i, p in enumerate(points) if not any(dominates(q, p) for j, q in enumerate(points) if j != i)]
    return sorted(keep, key=lambda i: (-points[i][1], points[i][0]))
