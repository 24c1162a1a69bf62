"""Dense (bf16/fp32) linears whose few- and many-row products run native kernels where measured faster.

``nn.Linear`` on a CPU multiplies one row by MKL's GEMV (fp32, about half the memory bandwidth on the
machines measured) or by an emulated bf16 kernel where the CPU has no bf16 dot products. A decode step is
one row per sequence and bound by reading the weights, so those rows go to ``miaotui.kernels.dense_gemv``
(fp32 accumulation, the same result up to summation order). More rows are compute-bound: there the
native register-blocked GEMM (``dense_gemm``) competes with the forward of the class that was replaced
(MKL). Which kernel wins at which row count is measured per shape when a model is prepared, from cold caches
when the model's weights overflow the last-level cache (a decode step then streams each layer's weights
from memory; timed hot, the kernels are within 10 % on some shapes and the choice is a coin toss:
docs/BENCHMARKS.md, session 8). On the 2-core
AVX2 VM: the GEMV up to 8-16 rows, the GEMM from there to 64-128 rows (continuous batching's decode steps:
SmolLM2's output projection at 32 rows 110 vs 52 GFLOP/s for MKL), MKL beyond (prefill, encoder batches).
Products of many rows may also go to oneDNN (``kernels/onednn.py``), where it measured faster than the
class's forward at ``MANY_ROWS``: on AMD CPUs with AVX-512, MKL runs its AVX2 code and oneDNN 2.3x faster.
"""

from __future__ import annotations

import torch
from torch import nn

from miaotui import kernels
from miaotui.kernels import onednn

GEMV_ROWS = 4  # rows the native kernel always takes (4 per pass over the weights); more where measured faster
# row counts timed per shape when a model is prepared; beyond 128 rows MKL's GEMM is as fast or faster here
# (prefill, encoder batches: 110-150 GFLOP/s on 2 cores, within the timing noise of the native one)
ROW_BUCKETS = (8, 16, 32, 64, 128)
GEMV_MAX_ROWS = 64  # the GEMV re-reads its weight tile every 4 rows: not a candidate beyond this
MAX_TIMED_FLOP = 4e9  # row counts whose product exceeds this are not timed (~30 ms a call): no native GEMM there
# PyTorch's forward must be this much faster to take a row count from the native kernels: at 8-64 rows it
# measured a third to a half of their rate here, and one noisy timing once gave it two of SmolLM2's four
# shapes at 16-32 rows (a 21-row decode step 143 vs 93 ms)
OWN_HANDICAP = 1.15
# the plan where timings cannot be trusted (another process on the cores): what most shapes measured here
DEFAULT_ROW_PLAN = {8: "gemv", 16: "gemm", 32: "gemm", 64: "gemm", 128: "own"}
# where oneDNN is timed against the class's forward for the products beyond the buckets: a prefill chunk or
# an encoder batch has hundreds to thousands of rows, and both libraries are at their plateau by 512
MANY_ROWS = 512


class GemvMixin:
    """Put before an ``nn.Linear`` class: inputs of at most ``gemv_rows`` rows take the native GEMV, then up
    to ``gemm_rows`` the native GEMM; from ``onednn_rows`` on (0: never) oneDNN's matmul; the rest keep the
    class's own forward."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    gemv_rows: int = GEMV_ROWS  # use_native_gemv sets the measured crossovers per module
    gemm_rows: int = 0
    onednn_rows: int = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # no autograd through the native ops: anything that needs gradients keeps the PyTorch path
        if not (x.requires_grad or self.weight.requires_grad):
            rows = x.numel() // x.shape[-1]
            if rows <= self.gemv_rows:
                return kernels.dense_gemv(x, self.weight, self.bias)
            if rows <= self.gemm_rows:
                return kernels.dense_gemm(x, self.weight, self.bias)
            if self._takes_onednn(x, rows):
                return onednn.linear(x, self.weight, self.bias)
        return super().forward(x)  # type: ignore[misc]

    def _takes_onednn(self, x: torch.Tensor, rows: int) -> bool:
        """Whether ``rows`` rows of inference input ``x`` go to oneDNN (autograd is checked by the caller)."""
        return 0 < self.onednn_rows <= rows and x.dtype == self.weight.dtype

    def forward_activated(self, x: torch.Tensor, activation: str, fn) -> torch.Tensor:
        """``fn(self(x))``, where ``fn`` is the activation named ``activation``; on oneDNN's path an activation
        it knows (``onednn.EPILOGUES``) runs in the matmul's epilogue instead of a pass of its own."""
        inference = not (x.requires_grad or self.weight.requires_grad)
        if activation in onednn.EPILOGUES and inference and self._takes_onednn(x, x.numel() // x.shape[-1]):
            return onednn.linear(x, self.weight, self.bias, activation)
        return fn(self(x))


class GemvLinear(GemvMixin, nn.Linear):
    """An ``nn.Linear`` (fp32 or bf16 weights) with native few-row products."""


def use_native_gemv(model: nn.Module, classes: dict[type, type] | None = None, measure: bool = True) -> int:
    """Swap, in place, every CPU linear whose exact type is a key of ``classes`` (default: ``nn.Linear``
    → ``GemvLinear``) and whose weight is contiguous fp32/bf16, for its value; the parameters (and ties)
    are kept, nothing is copied. With ``measure``, a shape takes the native kernels only where the native
    GEMV beats the module's own forward on one row (timed once per dtype and shape: MKL's fp32 GEMV or a
    native bf16 one can match it on some CPUs), then the GEMV and the GEMM up to the row counts where they
    measured fastest (``gemv_rows`` and ``gemm_rows``), and oneDNN from the row count where it did
    (``onednn_rows``, see ``row_kernels``); a module none of them beats keeps its class. Without
    ``measure``: the native GEMV up to ``GEMV_ROWS``. Returns the count swapped; 0 when neither the native
    kernels nor oneDNN are available."""
    from miaotui.compress.quant.kernels import cache_bytes, native_faster

    classes = classes or {nn.Linear: GemvLinear}
    candidates = [m for m in model.modules() if type(m) in classes and m.weight.device.type == "cpu"
                  and m.weight.dtype in (torch.float32, torch.bfloat16) and m.weight.is_contiguous()]
    if not candidates:
        return 0
    native_ok = kernels.available()
    if not (native_ok or (measure and onednn.available())):
        return 0
    # timed as they will run: weights that together overflow the cache come from memory every step
    cold = sum(m.weight.nbytes for m in candidates) > cache_bytes()
    n = 0
    for module in candidates:
        w = module.weight
        native = native_ok and (not measure or native_faster(
            ("dense-native-vs-torch", type(module).__name__, w.dtype, *w.shape, cold),
            lambda x, m=module: kernels.dense_gemv(x.to(w.dtype), m.weight, m.bias),
            lambda x, m=module: m.forward(x.to(w.dtype)), w.shape[1], cold=cold))
        own_forward = module.forward  # bound before the class changes: the forward many rows keep
        plan = row_kernels(module, own_forward, cold, native=native) if measure else (GEMV_ROWS, 0, 0)
        if not native and not plan[2]:
            continue
        module.__class__ = classes[type(module)]
        module.gemv_rows, module.gemm_rows, module.onednn_rows = plan
        n += 1
    return n


def row_kernels(module: nn.Module, own_forward, cold: bool = False, native: bool = True) -> tuple[int, int, int]:
    """(gemv_rows, gemm_rows, onednn_rows) for a dense linear: the fastest of the native GEMV, the native
    GEMM, oneDNN and ``own_forward`` at each of ``ROW_BUCKETS`` and ``MANY_ROWS`` (timed once per dtype,
    shape and ``cold``; ``native=False``: oneDNN against ``own_forward`` only). The GEMV keeps the row
    counts from ``GEMV_ROWS`` up for as long as it wins, then the GEMM up to the last count it won; oneDNN
    takes every count from the first one after those where it won, provided it won from there up to
    ``MANY_ROWS`` (0: never). ``cold``: timed from cold caches (see the module's docstring)."""
    from miaotui.compress.quant.kernels import fastest_by_rows

    w = module.weight
    out_f, in_f = w.shape
    rows = tuple(r for r in (*ROW_BUCKETS, MANY_ROWS) if 2 * r * in_f * out_f <= MAX_TIMED_FLOP)
    b = module.bias
    candidates = {"own": lambda x: own_forward(x.to(w.dtype))}
    if native:
        candidates |= {"gemv": lambda x: kernels.dense_gemv(x.to(w.dtype), w, b),
                       "gemm": lambda x: kernels.dense_gemm(x.to(w.dtype), w, b)}
    if onednn.available():
        candidates["onednn"] = lambda x: onednn.linear(x.to(w.dtype), w, b)
    plan = fastest_by_rows(
        ("dense-rows", type(module).__name__, w.dtype, *w.shape, cold, tuple(candidates)), candidates, in_f, rows,
        max_rows={"gemv": GEMV_MAX_ROWS}, default=DEFAULT_ROW_PLAN if native else {}, cold=cold,
        handicap={"own": OWN_HANDICAP} if native else None)
    gemv_rows = GEMV_ROWS if native else 0
    for n in sorted(plan):
        if plan[n] != "gemv":
            break
        gemv_rows = n
    # the GEMM up to the last row count it won: a narrow loss in between is noise (MKL's GEMM at 16-64 rows
    # runs at a third to a half of the native one on the VM measured), a gap would send it to the slow side
    gemm_rows = max((n for n in plan if plan[n] == "gemm" and n > gemv_rows), default=0)
    onednn_rows = 0
    for n in sorted(plan, reverse=True):  # down from the most rows timed, while oneDNN keeps winning
        if n <= max(gemv_rows, gemm_rows) or plan[n] != "onednn":
            break
        onednn_rows = n
    if onednn_rows:  # from just past the previous bucket (and the native kernels' rows; few rows are not timed)
        onednn_rows = max([n for n in plan if n < onednn_rows] + [gemv_rows, gemm_rows, GEMV_ROWS]) + 1
    return gemv_rows, gemm_rows, onednn_rows
