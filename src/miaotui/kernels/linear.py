"""Dense (bf16/fp32) linears whose few-row products run the native GEMV; more rows keep their old forward.

``nn.Linear`` on a CPU multiplies one row by MKL's GEMV (fp32, about half the memory bandwidth on the
machines measured) or by an emulated bf16 kernel where the CPU has no bf16 dot products. A decode step is
one row per sequence and bound by reading the weights, so those rows go to ``miaotui.kernels.dense_gemv``
(fp32 accumulation, the same result up to summation order); prefill and large batches are compute-bound
and keep the forward of the class that was replaced. Where that crossover lies is measured per shape: on
the 2-core AVX2 VM the native kernel beat MKL's GEMM up to 32 rows (a batched decode step of continuous
batching: SmolLM2's output projection 7.3 vs 19.4 ms at 8 rows, 20.0 vs 26.4 at 32; even at 48, behind at 64).
"""

from __future__ import annotations

import torch
from torch import nn

from miaotui import kernels

GEMV_ROWS = 4  # rows the native kernel always takes (4 per pass over the weights); more where measured faster


class GemvMixin:
    """Put before an ``nn.Linear`` class: inputs of at most ``gemv_rows`` rows take the native kernel."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    gemv_rows: int = GEMV_ROWS  # use_native_gemv sets the measured crossover per module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # no autograd through the native op: anything that needs gradients keeps the PyTorch path
        if x.numel() // x.shape[-1] <= self.gemv_rows and not (x.requires_grad or self.weight.requires_grad):
            return kernels.dense_gemv(x, self.weight, self.bias)
        return super().forward(x)  # type: ignore[misc]


class GemvLinear(GemvMixin, nn.Linear):
    """An ``nn.Linear`` (fp32 or bf16 weights) with native few-row products."""


def use_native_gemv(model: nn.Module, classes: dict[type, type] | None = None, measure: bool = True) -> int:
    """Swap, in place, every CPU linear whose exact type is a key of ``classes`` (default: ``nn.Linear``
    → ``GemvLinear``) and whose weight is contiguous fp32/bf16, for its value; the parameters (and ties)
    are kept, nothing is copied. With ``measure``, only shapes where the native kernel beats the module's
    own forward on one row are swapped (timed once per dtype and shape: MKL's fp32 GEMV or a native bf16
    one can match it on some CPUs), and each then takes as many rows natively as measured faster there
    (``gemv_rows``: 4, or 8 to 64 rows). Returns the count; 0 when the native kernels are unavailable."""
    from miaotui.compress.quant.kernels import native_faster, packed_rows_limit

    classes = classes or {nn.Linear: GemvLinear}
    candidates = [m for m in model.modules() if type(m) in classes and m.weight.device.type == "cpu"
                  and m.weight.dtype in (torch.float32, torch.bfloat16) and m.weight.is_contiguous()]
    if not candidates or not kernels.available():
        return 0
    n = 0
    for module in candidates:
        w = module.weight
        if measure and not native_faster(
                ("dense-native-vs-torch", type(module).__name__, w.dtype, *w.shape),
                lambda x, m=module: kernels.dense_gemv(x.to(w.dtype), m.weight, m.bias),
                lambda x, m=module: m.forward(x.to(w.dtype)), w.shape[1]):
            continue
        own_forward = module.forward  # bound before the class changes: the forward many rows keep
        module.__class__ = classes[type(module)]
        if measure:
            module.gemv_rows = packed_rows_limit(
                ("dense-rows", type(module).__name__, w.dtype, *w.shape),
                lambda x, m=module: kernels.dense_gemv(x.to(w.dtype), m.weight, m.bias),
                lambda x, f=own_forward: f(x.to(w.dtype)), w.shape[1], assume=GEMV_ROWS)
        n += 1
    return n
