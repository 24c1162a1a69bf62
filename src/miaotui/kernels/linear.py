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
"""

from __future__ import annotations

import torch
from torch import nn

from miaotui import kernels

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


class GemvMixin:
    """Put before an ``nn.Linear`` class: inputs of at most ``gemv_rows`` rows take the native GEMV, then up
    to ``gemm_rows`` the native GEMM; more keep the class's own forward."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    gemv_rows: int = GEMV_ROWS  # use_native_gemv sets the measured crossovers per module
    gemm_rows: int = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # no autograd through the native ops: anything that needs gradients keeps the PyTorch path
        if not (x.requires_grad or self.weight.requires_grad):
            rows = x.numel() // x.shape[-1]
            if rows <= self.gemv_rows:
                return kernels.dense_gemv(x, self.weight, self.bias)
            if rows <= self.gemm_rows:
                return kernels.dense_gemm(x, self.weight, self.bias)
        return super().forward(x)  # type: ignore[misc]


class GemvLinear(GemvMixin, nn.Linear):
    """An ``nn.Linear`` (fp32 or bf16 weights) with native few-row products."""


def use_native_gemv(model: nn.Module, classes: dict[type, type] | None = None, measure: bool = True) -> int:
    """Swap, in place, every CPU linear whose exact type is a key of ``classes`` (default: ``nn.Linear``
    → ``GemvLinear``) and whose weight is contiguous fp32/bf16, for its value; the parameters (and ties)
    are kept, nothing is copied. With ``measure``, only shapes where the native GEMV beats the module's
    own forward on one row are swapped (timed once per dtype and shape: MKL's fp32 GEMV or a native bf16
    one can match it on some CPUs), and each then takes the GEMV and the GEMM up to the row counts where
    they measured fastest (``gemv_rows`` and ``gemm_rows``, see ``row_kernels``). Returns the count; 0 when
    the native kernels are unavailable."""
    from miaotui.compress.quant.kernels import cache_bytes, native_faster

    classes = classes or {nn.Linear: GemvLinear}
    candidates = [m for m in model.modules() if type(m) in classes and m.weight.device.type == "cpu"
                  and m.weight.dtype in (torch.float32, torch.bfloat16) and m.weight.is_contiguous()]
    if not candidates or not kernels.available():
        return 0
    # timed as they will run: weights that together overflow the cache come from memory every step
    cold = sum(m.weight.nbytes for m in candidates) > cache_bytes()
    n = 0
    for module in candidates:
        w = module.weight
        if measure and not native_faster(
                ("dense-native-vs-torch", type(module).__name__, w.dtype, *w.shape, cold),
                lambda x, m=module: kernels.dense_gemv(x.to(w.dtype), m.weight, m.bias),
                lambda x, m=module: m.forward(x.to(w.dtype)), w.shape[1], cold=cold):
            continue
        own_forward = module.forward  # bound before the class changes: the forward many rows keep
        module.__class__ = classes[type(module)]
        if measure:
            module.gemv_rows, module.gemm_rows = row_kernels(module, own_forward, cold)
        n += 1
    return n


def row_kernels(module: nn.Module, own_forward, cold: bool = False) -> tuple[int, int]:
    """(gemv_rows, gemm_rows) for a dense linear: the fastest of the native GEMV, the native GEMM and
    ``own_forward`` at each of ``ROW_BUCKETS`` (timed once per dtype, shape and ``cold``); the GEMV keeps
    the row counts from ``GEMV_ROWS`` up for as long as it wins, then the GEMM up to the last count it won.
    ``cold``: timed from cold caches (see the module's docstring)."""
    from miaotui.compress.quant.kernels import fastest_by_rows

    w = module.weight
    out_f, in_f = w.shape
    rows = tuple(r for r in ROW_BUCKETS if 2 * r * in_f * out_f <= MAX_TIMED_FLOP)
    b = module.bias
    plan = fastest_by_rows(
        ("dense-rows", type(module).__name__, w.dtype, *w.shape, cold),
        {"gemv": lambda x: kernels.dense_gemv(x.to(w.dtype), w, b),
         "gemm": lambda x: kernels.dense_gemm(x.to(w.dtype), w, b),
         "own": lambda x: own_forward(x.to(w.dtype))}, in_f, rows, max_rows={"gemv": GEMV_MAX_ROWS},
        default=DEFAULT_ROW_PLAN, cold=cold, handicap={"own": OWN_HANDICAP})
    gemv_rows = GEMV_ROWS
    for n in sorted(plan):
        if plan[n] != "gemv":
            break
        gemv_rows = n
    # the GEMM up to the last row count it won: a narrow loss in between is noise (MKL's GEMM at 16-64 rows
    # runs at a third to a half of the native one on the VM measured), a gap would send it to the slow side
    gemm_rows = max((n for n in plan if plan[n] == "gemm" and n > gemv_rows), default=0)
    return gemv_rows, gemm_rows
