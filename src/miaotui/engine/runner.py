"""Forward passes for generation: eager prefill, and a decode step that can be compiled.

The compiled decode takes its position as a tensor, so one graph serves every step (an int position
would be a new constant, hence a recompile, at each token).
"""

from __future__ import annotations

import time

import torch

from miaotui.models import CausalLM


class Runner:
    def __init__(self, model: CausalLM, compile: bool = False, mode: str | None = None):
        self.model = model
        self.compiled = compile
        self.compile_s = 0.0  # wall time spent compiling (first calls), reported apart from run time
        self._decode_fn = (torch.compile(self._decode_eager, fullgraph=True, dynamic=False, mode=mode)
                           if compile else None)
        self._seen_cache_len = -1

    def _decode_eager(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.model(token, pos)[:, -1]

    def prefill(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """ids (B, T) → logits of the last position (B, V)."""
        return self.model(ids, start, last_only=True)[:, -1]

    def decode(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        """token (B, 1) at position ``pos`` → logits (B, V)."""
        if self._decode_fn is None:
            return self.model(token, pos, last_only=True)[:, -1]
        pos_t = torch.tensor(pos, device=token.device)
        if self.model.cache_len != self._seen_cache_len:  # new cache shape: this call compiles
            self._seen_cache_len = self.model.cache_len
            t0 = time.perf_counter()
            out = self._decode_fn(token, pos_t)
            self.compile_s += time.perf_counter() - t0
            return out
        return self._decode_fn(token, pos_t)
