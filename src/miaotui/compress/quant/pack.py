"""Portable int4 packing: two codes per byte, the even column in the low nibble (kernel-independent, saved
in checkpoints; each runtime repacks for its kernel at load)."""

from __future__ import annotations

import torch


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes in [0, 15], shape [N, K] (K even) → uint8 [N, K // 2]."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got {q.shape[-1]}")
    if q.min() < 0 or q.max() > 15:
        raise ValueError("int4 codes must lie in [0, 15]")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K // 2] → uint8 codes [N, K]."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1)
