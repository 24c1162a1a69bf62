"""The physical ceiling of batch-1 decode: every token reads every weight once, so
tok/s <= memory bandwidth / weight bytes."""

from __future__ import annotations

import time

import torch


def measure_read_bandwidth(n_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Achievable read bandwidth in bytes/s: median over repeats of summing a buffer larger than any cache."""
    x = torch.ones(n_bytes // 4, dtype=torch.float32)
    x.sum()  # fault the pages in
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return n_bytes / sorted(times)[len(times) // 2]


def decode_ceiling(weight_bytes: int, bandwidth: float) -> float:
    return bandwidth / weight_bytes if weight_bytes else 0.0
