"""Native GEMV kernels for few-row (decode) products: int8, int4 and bf16/fp32 weights, fp32 activations.

``available()`` builds/loads them once (see ``build.py``); the functions below take activations of any
shape ``[..., in_features]`` and dtype and return the same dtype, like ``F.linear``. They are registered as
torch custom ops (``torch.ops.miaotui.gemv_*``), so a ``torch.compile``d decode step calls them without a
graph break.

    >>> if available():
    ...     y = int8_gemv(x, qweight, scale)        # == F.linear(x, qweight.float() * scale[:, None])
"""

from __future__ import annotations

import torch

from miaotui.kernels.build import ENV, load as available, loaded_isa

__all__ = ["ENV", "INT4_GROUP_MULTIPLE", "INT8_GROUP_MULTIPLE", "available", "loaded_isa", "int8_gemv", "int4_gemv",
           "dense_gemv", "dense_gemm", "varlen_attention", "paged_decode_attention", "rms_norm", "silu_mul", "rope"]

INT4_GROUP_MULTIPLE = 32  # int4 groups must be whole 16-byte blocks of 32 codes (see csrc/gemv.cpp)
INT8_GROUP_MULTIPLE = 16  # grouped int8 scales: groups of whole vectors (16 lanes with AVX-512)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).float().contiguous()


def _bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.float().contiguous()


def int8_gemv(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """x · (qweight * scale)ᵀ + bias; qweight int8 [out, in]; scale fp32 [out] (per row) or [out, groups]
    (per group of in / groups columns, a multiple of ``INT8_GROUP_MULTIPLE``)."""
    y = torch.ops.miaotui.gemv_int8(_rows(x), qweight, scale, _bias(bias))
    return y.to(x.dtype).reshape(*x.shape[:-1], qweight.shape[0])


def int4_gemv(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """x · Wᵀ + bias with W = (codes - zero) * scale per group; qweight uint8 [out, in/2] in the portable
    layout of ``compress/quant/pack.py``, scale and zero fp16 [out, in/group_size]; group_size % 32 == 0."""
    y = torch.ops.miaotui.gemv_int4(_rows(x), qweight, scale, zero, group_size, _bias(bias))
    return y.to(x.dtype).reshape(*x.shape[:-1], qweight.shape[0])


def dense_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x · weightᵀ + bias for a bf16 or fp32 weight [out, in], accumulated in fp32."""
    y = torch.ops.miaotui.gemv_dense(_rows(x), weight, _bias(bias))
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def dense_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x · weightᵀ + bias for many rows (a register-blocked GEMM, ``csrc/gemm.cpp``); weight bf16 or fp32
    [out, in], accumulated in fp32. Same result as ``dense_gemv`` up to summation order."""
    y = torch.ops.miaotui.gemm_dense(_rows(x), weight, _bias(bias))
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def varlen_attention(qkv: torch.Tensor, cu_seqlens: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """Bidirectional attention within each of B packed sequences: qkv [N, 3W] (q | k | v, W = heads ×
    head_dim, head_dim % 8 == 0), sequence b = rows cu_seqlens[b]:cu_seqlens[b+1] → [N, W], in qkv's dtype
    (computed in fp32). Equals softmax(q kᵀ · scale) v per sequence and head."""
    y = torch.ops.miaotui.varlen_attention(qkv.float(), cu_seqlens, heads, scale)
    return y.to(qkv.dtype)


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, block_size: int, scale: float,
                           window: int | None = None) -> torch.Tensor:
    """One query per sequence over a paged fp32 KV cache: q [B, H, D]; pools [slots, Hkv, D] (GQA: H a
    multiple of Hkv); sequence b's key j in slot block_tables[b, j // block_size] * block_size + j % block_size;
    it sees its last ``window`` keys (None: all) of context_lens[b] → [B, H, D]."""
    return torch.ops.miaotui.paged_decode_attention(q.contiguous(), k_pool, v_pool, block_tables, context_lens,
                                                    block_size, scale, window or 0)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """fp32 ``weight * (x * rsqrt(mean(x², -1) + eps))`` in one pass (``csrc/elementwise.cpp``); x [..., C]."""
    return torch.ops.miaotui.rms_norm(_rows(x), weight, eps).reshape(x.shape)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """fp32 ``silu(gate) * up`` for ``gate, up = gate_up.chunk(2, -1)``, in one pass: [..., 2F] → [..., F]."""
    y = torch.ops.miaotui.silu_mul(_rows(gate_up))
    return y.reshape(*gate_up.shape[:-1], gate_up.shape[-1] // 2)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding of fp32 x [B, H, T, D] (rows contiguous, any other strides) by cos/sin
    holding T x D values: ``x * cos + cat(-x2, x1) * sin`` as one pass, contiguous out."""
    return torch.ops.miaotui.rope(x, cos.contiguous(), sin.contiguous())
