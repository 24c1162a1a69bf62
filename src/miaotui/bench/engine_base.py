"""The interface every benchmarked engine implements, so all are timed by the same code.

Each engine runs greedy, EOS ignored, with its prompt cache emptied before every call (no prefix reuse).
Kept free of torch so a peer's process (and its peak RSS) holds only the peer.
"""

from __future__ import annotations


class Engine:
    name = ""
    weight_bytes = 0  # bytes read per decoded token (the roofline's denominator)
    compile_s = 0.0

    def prefill(self, ids: list[int]) -> None:
        """Empty cache → logits of the last prompt position → one sampled token."""
        raise NotImplementedError

    def generate(self, ids: list[int], n: int) -> None:
        """Prompt + exactly ``n`` new tokens."""
        raise NotImplementedError

    def batch_generate(self, prompts: list[list[int]], max_new: list[int]) -> None:
        """All requests at once, each to exactly its own number of new tokens (``throughput.py``)."""
        raise NotImplementedError(f"{self.name} has no batched generation here")
