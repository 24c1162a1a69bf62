"""Aggregate throughput: N requests submitted at once, mixed prompt and output lengths, EOS ignored.

tok/s = generated tokens / wall time from submission to the last token (prefills included). Engines
without continuous batching pay for their own policy: transformers pads the batch and runs every row
to the longest requested output, and only the requested tokens count.
"""

from __future__ import annotations

import time

PROMPT_LENGTHS = (32, 64, 128, 256)
OUTPUT_LENGTHS = (32, 64, 128)


def workload(prompt, n: int) -> tuple[list[list[int]], list[int]]:
    """``n`` deterministic requests cycling through the prompt and output lengths."""
    prompts = [prompt(PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)]) for i in range(n)]
    outputs = [OUTPUT_LENGTHS[i % len(OUTPUT_LENGTHS)] for i in range(n)]
    return prompts, outputs


def measure_throughput(engine, prompt, concurrency=(8, 32), repeats: int = 3, progress=lambda s: None) -> dict:
    out = {}
    for n in concurrency:
        progress(f"throughput x{n}")
        prompts, outputs = workload(prompt, n)
        engine.batch_generate(prompts[:2], [4, 4])  # warm the batched path
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            engine.batch_generate(prompts, outputs)
            times.append(time.perf_counter() - t0)
        out[str(n)] = sum(outputs) / sorted(times)[len(times) // 2]
    return out
