"""Make a loaded encoder fast without changing what it computes.

- q/k/v fused into one projection (one larger matmul instead of three).
- quantized linears (a compressed checkpoint) prepared: kernel buffers, the fastest kernel measured per shape.
- bf16 on a CPU without bf16 instructions (no AVX512-BF16/AMX): every encoder matmul has many rows, and
  emulated bf16 matmuls measured 5.7x slower than fp32 here (all-MiniLM-L6-v2, 32 paragraphs, 1 thread:
  9.3 s vs 1.64 s), so the linears compute in fp32 from the bf16 weights (1.68 s): bf16 then saves memory,
  not time. CPUs with native bf16 keep the bf16 kernels.
- attention by the native varlen kernel (``kernels.varlen_attention``) on the packed tokens, where it runs:
  CPU, head_dim a multiple of 8. On all-MiniLM-L6-v2's shapes (32 sequences of 100-256 tokens) it takes
  24-27 ms a layer against SDPA's 51-56 ms with the gathers around it (AVX2 VM). It computes in fp32; bf16
  activations are widened for it, which still beat SDPA's bf16 kernel on a CPU with bf16 instructions
  (the AVX-512 Zen 5 VM: 100 paragraphs 113 -> 142 texts/s, docs/BENCHMARKS.md, session 10).
- dense linears of few rows (a single short input: one row per token) by the native GEMV or GEMM where
  they measured faster than MKL per shape (``kernels/linear.py``); batches of many texts keep MKL.
"""

from __future__ import annotations

import torch

from miaotui import kernels
from miaotui.cpu import has_native_bf16
from miaotui.engine.prepare import upcast_many_row_matmuls, use_native_dense
from miaotui.models.bert import BertEncoder


def prepare_encoder(model: BertEncoder) -> BertEncoder:
    from miaotui.compress.quant.qlinear import prepare_quantized

    model.fuse()
    prepare_quantized(model)  # a compressed checkpoint: each quantized linear picks its kernel by measurement
    weight = model.embeddings.word_embeddings.weight
    if weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and has_native_bf16() is False:
        upcast_many_row_matmuls(model)
    use_native_dense(model)  # CPU linears only; MIAOTUI_NATIVE_DENSE=0 keeps PyTorch's
    if weight.device.type == "cpu" and model.args.head_dim % 8 == 0 and kernels.available():
        for layer in model.layers:
            layer.attention.native = True
    return model
