"""Which kernel each quantized matmul uses, chosen by measurement on this machine.

PyTorch's packed CPU kernels (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``) read 4–8x fewer
bytes than an fp32 matmul, which is what a one-row decode step is bound by; with many rows (prefill,
large batches) the matmul is compute-bound and dequantize-then-fp32-matmul wins. The crossover row count
depends on the CPU and the shape, so it is measured once per shape (a few ms) and cached for the process.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
_crossover: dict[tuple, int] = {}


def _time(fn: Callable[[], object], reps: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def packed_rows_limit(key: tuple, packed: Callable[[torch.Tensor], object],
                      reference: Callable[[torch.Tensor], object], in_features: int) -> int:
    """Largest row count (0 = none) up to which ``packed(x)`` beats ``reference(x)``; cached by ``key``."""
    if key not in _crossover:
        limit = 0
        with torch.inference_mode():
            for rows in ROW_BUCKETS:
                x = torch.randn(rows, in_features)
                try:
                    faster = _time(lambda: packed(x)) < _time(lambda: reference(x))
                except RuntimeError:  # the kernel refuses this shape/dtype on this build
                    break
                if not faster:
                    break
                limit = rows
        _crossover[key] = limit
    return _crossover[key]


def faster_at(key: tuple, candidate: Callable[[torch.Tensor], object], reference: Callable[[torch.Tensor], object],
              in_features: int, rows: int) -> bool:
    """Whether ``candidate`` beats ``reference`` on ``rows`` rows (False if it fails); cached by ``key``."""
    if key not in _crossover:
        with torch.inference_mode():
            x = torch.randn(rows, in_features)
            try:
                _crossover[key] = int(_time(lambda: candidate(x)) < _time(lambda: reference(x)))
            except RuntimeError:
                _crossover[key] = 0
    return bool(_crossover[key])


def int8pack_supported() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def int4pack_supported() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
