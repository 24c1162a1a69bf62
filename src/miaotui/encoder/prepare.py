"""Make a loaded encoder fast without changing what it computes.

- q/k/v fused into one projection (one larger matmul instead of three).
- quantized linears (a compressed checkpoint) prepared: kernel buffers, the fastest kernel measured per shape.
- bf16 on a CPU without bf16 instructions (no AVX512-BF16/AMX): every encoder matmul has many rows, and
  emulated bf16 matmuls measured 5.7x slower than fp32 here (all-MiniLM-L6-v2, 32 paragraphs, 1 thread:
  9.3 s vs 1.64 s), so the linears compute in fp32 from the bf16 weights (1.68 s): bf16 then saves memory,
  not time. CPUs with native bf16 keep the bf16 kernels.
"""

from __future__ import annotations

import torch

from miaotui.cpu import has_native_bf16
from miaotui.models.bert import BertEncoder


def prepare_encoder(model: BertEncoder) -> BertEncoder:
    from miaotui.compress.quant.qlinear import prepare_quantized

    model.fuse()
    prepare_quantized(model)  # a compressed checkpoint: each quantized linear picks its kernel by measurement
    weight = model.embeddings.word_embeddings.weight
    if weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and has_native_bf16() is False:
        from miaotui.engine.prepare import upcast_many_row_matmuls

        upcast_many_row_matmuls(model)
    return model
