"""int8 KV cache: K and V stored as int8 with one fp32 scale per (position, head), symmetric.

A quarter of fp32's bytes (plus 4 bytes of scale per head_dim values) for long contexts and many
sequences; the attention itself runs on the dequantized values in the model's dtype."""

from __future__ import annotations

import torch


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., D) → int8 codes (..., D) and scales (..., 1)."""
    scale = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-8) / 127.0
    return torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8), scale


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


def parse_kv_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """'auto'/None: the model's dtype; 'int8': the quantized cache."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return None
    if name == "int8":
        return torch.int8
    raise ValueError(f"unknown KV cache dtype {name!r} (choose auto or int8)")
