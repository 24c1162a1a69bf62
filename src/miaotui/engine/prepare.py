"""Make a loaded model fast on the hardware at hand, without changing what it computes.

- q/k/v and gate/up are fused (fewer, larger matmuls; same math).
- bf16 on a CPU without native bf16 dot products (no AVX512-BF16/AMX): weights stay bf16, so a decode step
  reads half the bytes of fp32, but inputs of many rows (prefill, batches) are multiplied in fp32, where
  emulated bf16 matmuls are ~6x slower. One-row decode keeps the bf16 kernel (it is bandwidth-bound).
- Few-row products (decode) of bf16/fp32 linears run miaotui's native GEMV where it builds and measured
  faster on one row (``miaotui.kernels``: both threads stream the weights; PyTorch's one-row GEMV uses one).
  Compiled fp32 decode 35.9 vs ~23.4 tok/s on the 2-core AVX2 VM (docs/BENCHMARKS.md). Batched decode
  steps (8-128 rows) take the GEMV or the native GEMM, whichever measured fastest per shape and row count
  (``kernels/linear.py``).
  ``MIAOTUI_NATIVE_DENSE=0`` keeps PyTorch's kernels for dense linears.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from miaotui.cpu import has_native_bf16
from miaotui.kernels.linear import GemvMixin, GemvLinear, use_native_gemv
from miaotui.models import CausalLM


class UpcastLinear(nn.Linear):
    """A bf16 ``nn.Linear`` that computes in fp32 for inputs of at least ``MIN_ROWS`` rows."""

    MIN_ROWS = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // x.shape[-1] < self.MIN_ROWS:
            return F.linear(x, self.weight, self.bias)
        bias = self.bias.float() if self.bias is not None else None
        return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)


class GemvUpcastLinear(GemvMixin, UpcastLinear):
    """``UpcastLinear`` whose few-row products take the native GEMV."""


def upcast_many_row_matmuls(model: nn.Module) -> int:
    """Swap every plain bf16 ``nn.Linear`` for ``UpcastLinear`` in place (weights, ties kept); returns the count."""
    n = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.dtype == torch.bfloat16:
            module.__class__ = UpcastLinear  # same parameters, new forward: nothing is copied
            n += 1
    return n


def _native_dense_enabled() -> bool:
    return os.environ.get("MIAOTUI_NATIVE_DENSE", "1") != "0"


def use_native_dense(model: nn.Module) -> int:
    """Swap the dense (fp32/bf16, upcast or not) linears of a prepared model for their native-kernel classes
    (``kernels/linear.py``) unless ``MIAOTUI_NATIVE_DENSE=0``; returns the count. Decoders and encoders alike."""
    if not _native_dense_enabled():
        return 0
    return use_native_gemv(model, {nn.Linear: GemvLinear, UpcastLinear: GemvUpcastLinear})


def use_native_elementwise(model: nn.Module) -> int:
    """Turn on the one-pass RMSNorm, rotary and silu·up kernels (``kernels/csrc/elementwise.cpp``) of a CPU
    model's modules that have them (``native_ops`` flags); they run for fp32 activations without autograd, so
    bf16 models and training keep PyTorch's ops. Off with ``MIAOTUI_NATIVE_DENSE=0``. Returns the count."""
    from miaotui import kernels

    if not _native_dense_enabled() or not kernels.available():
        return 0
    n = 0
    for module in model.modules():
        if "native_ops" in type(module).__dict__ and all(p.device.type == "cpu" for p in module.parameters()):
            module.native_ops = True
            n += 1
    return n


def prepare_for_inference(model: CausalLM) -> CausalLM:
    from miaotui.compress.quant.qlinear import prepare_quantized

    model.fuse()
    prepare_quantized(model)  # packed kernels and their measured crossovers (a no-op for a dense model)
    head = model.lm_head
    if model.device.type == "cpu" and isinstance(head, nn.Linear) and head.weight.dtype == torch.bfloat16 \
            and has_native_bf16() is False:
        upcast_many_row_matmuls(model)
    use_native_dense(model)
    use_native_elementwise(model)
    return model
