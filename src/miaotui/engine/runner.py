"""Forward passes for generation: eager prefill, and a decode step that can be compiled.

The compiled decode takes its position as a tensor, so one graph serves every step (an int position
would be a new constant, hence a recompile, at each token). A single sequence on CPU decodes with the
fused native step instead, compiled or not, where it covers the model (``kernels/decode_plan.py``): one
C++ call per token, no Python per layer, nothing to compile; the (compiled) PyTorch forward serves the rest
(batches, other architectures, int8 KV caches) and ``native=False`` (the reference path in tests).
"""

from __future__ import annotations

import time

import torch

from miaotui.kernels.decode_plan import NativeDecode
from miaotui.models import CausalLM


class Runner:
    def __init__(self, model: CausalLM, compile: bool = False, mode: str | None = None, native: bool = True):
        self.model = model
        self.compiled = compile
        self.native = native  # one sequence decodes through the fused native step where it covers the model
        self.native_reason = ""  # why the last build attempt did not apply ("" when it did or none was tried)
        self._native: NativeDecode | None = None
        self._native_cache: object = None  # the cache object the last build attempt saw
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
        if self.native and token.shape[0] == 1:
            step = self._native_step()
            if step is not None:
                return step(token, pos)
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

    def _native_step(self) -> NativeDecode | None:
        if not isinstance(self.model, CausalLM):  # e.g. a stand-in model in tests: nothing to read
            return None
        cache = self.model.attention_layers()[0].kv_cache
        if cache is not self._native_cache:  # a new cache (or the first call): build the plan for it (~1 ms)
            self._native_cache = cache
            self._native, self.native_reason = NativeDecode.build(self.model)
        return self._native
