"""Blocked causal attention (models/blocked_attention.py), bf16 prefill on CPUs with native bf16: the same
result as an fp64 masked softmax, for a fresh prompt and a chunk after cached positions, GQA, sliding
windows, and lengths that are not a multiple of the block."""

from __future__ import annotations

import pytest
import torch

from miaotui.models import base
from miaotui.models.blocked_attention import BLOCK, blocked_causal_attention


def reference(q, k, v, start, scale, window=None):
    """fp64 softmax(q kᵀ · scale, masked) v, K/V heads repeated for GQA."""
    g = q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(g, dim=1) for x in (k, v))
    scores = q.double() @ k.transpose(-1, -2) * scale
    t, s = q.shape[2], k.shape[2]
    q_pos = torch.arange(start, start + t)[:, None]
    k_pos = torch.arange(s)[None, :]
    hide = k_pos > q_pos
    if window is not None:
        hide |= k_pos <= q_pos - window
    return torch.softmax(scores.masked_fill(hide, float("-inf")), -1) @ v


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
@pytest.mark.parametrize("start,t,window", [(0, 5, None), (0, BLOCK + 37, None), (19, 2 * BLOCK + 3, None),
                                            (0, BLOCK + 9, 40), (70, 50, 64)])
def test_blocked_attention_equals_the_masked_softmax(dtype, tol, heads, kv_heads, start, t, window):
    g = torch.Generator().manual_seed(t + start)
    d = 16
    q = torch.randn(2, heads, t, d, generator=g).to(dtype)
    k, v = (torch.randn(2, kv_heads, start + t, d, generator=g).to(dtype) for _ in range(2))
    got = blocked_causal_attention(q, k, v, start, d ** -0.5, window)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.double(), reference(q, k, v, start, d ** -0.5, window), atol=tol, rtol=tol)


def test_bf16_prefill_takes_the_blocked_path_only_with_native_bf16(monkeypatch):
    """``attend`` sends bf16 CPU prefill to it where the CPU has bf16 dot products; fp32 keeps SDPA."""
    calls = []
    real = base.blocked_causal_attention
    monkeypatch.setattr(base, "blocked_causal_attention", lambda *a: calls.append(a[0].dtype) or real(*a))
    q = torch.randn(1, 2, 8, 16)
    k, v = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    for native in (True, False):
        monkeypatch.setattr(base, "has_native_bf16", lambda n=native: n)
        for dtype in (torch.float32, torch.bfloat16):
            y = base.attend(q.to(dtype), k.to(dtype), v.to(dtype), 0)
            torch.testing.assert_close(y.double(), reference(q.to(dtype), k.to(dtype), v.to(dtype), 0, 0.25),
                                       atol=3e-2, rtol=3e-2)
    assert calls == [torch.bfloat16]
