"""Latency of one engine: prefill tok/s at several prompt lengths, TTFT, batch-1 decode tok/s.

Decode tok/s = (N - 1) / (t(N new tokens) - t(1 new token)) from the same prompt: prefill and the
first token cancel out, so every engine is measured by one formula whatever its internals.
Every figure is the median of ``repeats`` runs after a warm-up.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from miaotui.bench.engine_base import Engine


def timed(fn: Callable[[], None], repeats: int) -> float:
    """Median wall time of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_latency(engine: Engine, prompt: Callable[[int], list[int]], prefill_lengths=(128, 512, 2048),
                    decode_prompt: int = 32, decode_tokens: int = 128, repeats: int = 3,
                    progress: Callable[[str], None] = lambda s: None) -> dict:
    out: dict = {"engine": engine.name, "prefill_tok_s": {}, "repeats": repeats}
    progress("warm-up")
    engine.generate(prompt(decode_prompt), 8)  # first calls pay for allocation, kernels, compilation
    engine.prefill(prompt(min(prefill_lengths)))
    for n in prefill_lengths:
        progress(f"prefill {n}")
        ids = prompt(n)
        engine.prefill(ids)  # warm this shape
        t = timed(lambda: engine.prefill(ids), repeats)
        out["prefill_tok_s"][str(n)] = n / t
        if n == 512 or "ttft_s" not in out:
            out["ttft_s"] = t
    progress(f"decode {decode_tokens}")
    ids = prompt(decode_prompt)
    engine.generate(ids, decode_tokens)  # warm the cache length this run needs
    t1 = timed(lambda: engine.generate(ids, 1), repeats)
    tn = timed(lambda: engine.generate(ids, decode_tokens), repeats)
    out["decode_tok_s"] = (decode_tokens - 1) / (tn - t1)
    out["weight_bytes"] = engine.weight_bytes
    out["compile_s"] = engine.compile_s
    return out
