"""Causal attention of a prefill chunk as two batched matmuls per block of queries, for bf16 on CPUs with
native bf16 dot products.

PyTorch's CPU flash-attention kernel runs bf16 at its fp32 rate (~80 GFLOP/s at 512 tokens on the 2-core
Zen 5 VM): 43 % of a bf16 prefill of 512 tokens went there. As matmuls, bf16 runs through oneDNN's bf16
kernels: SmolLM2's 9 heads x 512 tokens in 1.4 vs 3.6 ms, 2048 tokens in 16.6 vs 34 ms (docs/BENCHMARKS.md,
session 10). Each block of queries meets only the keys up to its own last position (causality skips the
rest), and query heads that share a KV head are stacked as rows of one matmul (GQA without repeating K/V).
Scores are fp32 sums rounded to bf16 (oneDNN's output); the softmax computes in fp32 and rounds to bf16 for
the second matmul, as SDPA's bf16 kernel does.
"""

from __future__ import annotations

import torch

BLOCK = 128  # queries per block: 64-128 measured best; 256 was 3x slower (scores fall out of L2)


def blocked_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float,
                             window: int | None = None) -> torch.Tensor:
    """q: (B, H, T, D) at positions [start, start+T); k, v: (B, Hkv, start+T, D) → (B, H, T, D)."""
    b, h, t, d = q.shape
    hkv = k.shape[1]
    g = h // hkv
    out = torch.empty_like(q)
    ahead = torch.ones(BLOCK, BLOCK, dtype=torch.bool).triu_(1)  # key after query, within a block
    grouped_q = q.view(b, hkv, g, t, d)
    grouped_out = out.view(b, hkv, g, t, d)
    for s in range(0, t, BLOCK):
        e = min(t, s + BLOCK)
        c, end = e - s, start + e  # keys [lo, end) are the most this block can see
        lo = max(0, start + s - window + 1) if window is not None else 0
        rows = (grouped_q[:, :, :, s:e] * scale).reshape(b, hkv, g * c, d)
        scores = torch.matmul(rows, k[:, :, lo:end].transpose(-1, -2)).view(b, hkv, g, c, end - lo)
        if window is None:  # only the block's own c keys can lie ahead of a query
            scores[..., end - lo - c:].masked_fill_(ahead[:c, :c], float("-inf"))
        else:  # the block's queries against keys [0, end), as SDPA's path masks them, from lo on
            from miaotui.models.base import attention_mask  # base imports this module

            scores.masked_fill_(~attention_mask(c, start + s, window, q.device)[:, lo:], float("-inf"))
        # PyTorch's CPU softmax of bf16 computes in fp32 and rounds the result: what the second matmul reads
        probs = torch.softmax(scores, dim=-1).view(b, hkv, g * c, end - lo)
        grouped_out[:, :, :, s:e] = torch.matmul(probs, v[:, :, lo:end]).view(b, hkv, g, c, d)
    return out
