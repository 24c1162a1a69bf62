"""Building blocks shared by the architectures: norms, rotary embeddings, the static KV cache, attention.

Every projection in a model is a plain ``nn.Linear`` attribute, so compression and tensor parallel can swap
it for a quantized / sparse / low-rank / sharded module without the model file knowing.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from miaotui import kernels
from miaotui.cpu import has_native_bf16
from miaotui.errors import ModelLoadError
from miaotui.models.blocked_attention import blocked_causal_attention


class RMSNorm(nn.Module):
    native_ops = False  # prepare_for_inference: fp32 inference runs the one-pass kernel (kernels.rms_norm)

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native_ops and x.dtype == torch.float32 and not (x.requires_grad or self.weight.requires_grad):
            return kernels.rms_norm(x, self.weight, self.eps)
        # normalise in fp32 like the reference, scale in the input dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_parameters(cfg: dict[str, Any]) -> dict[str, Any]:
    """Normalise the two HF spellings (``rope_theta`` + ``rope_scaling`` or v5's ``rope_parameters``)."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    params.update({k: v for k, v in scaling.items() if k not in params})
    params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or params.get("type") or "default"
    params["rope_type"] = kind
    return params


def rope_inv_freq(head_dim: int, params: dict[str, Any], max_pos: int) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,) in fp64, with the scaling the config asks for."""
    base = float(params["rope_theta"])
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    kind = params["rope_type"]
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / float(params["factor"])
    if kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate between
        factor = float(params["factor"])
        low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
        old_ctx = float(params.get("original_max_position_embeddings", max_pos))
        wavelen = 2 * math.pi / inv
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_ctx / low, inv / factor, inv)
        mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        return torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    raise ModelLoadError(f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3)")


def rope_tables(head_dim: int, params: dict[str, Any], max_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (max_pos, head_dim) in fp32, laid out for rotate-half."""
    inv = rope_inv_freq(head_dim, params, max_pos)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().float(), emb.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, native: bool = False) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (T, D). ``native``: fp32 inference may take the one-pass kernel."""
    if native and x.dtype == torch.float32 and not x.requires_grad and x.stride(-1) == 1 \
            and cos.numel() == x.shape[2] * x.shape[3]:
        return kernels.rope(x, cos, sin)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def dense_linears(module: nn.Module) -> dict[str, nn.Linear]:
    """Every float linear under ``module`` by qualified name: ``nn.Linear`` and the subclasses that
    preparing a model swaps in for faster kernels (``GemvLinear``, ``UpcastLinear``), which compression
    must treat alike; not quantized or factorised layers (not ``nn.Linear``s)."""
    return {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear)}


def fuse_linears(linears: list[nn.Linear]) -> tuple[nn.Linear, list[int]]:
    """One Linear computing ``cat([l(x) for l in linears], -1)``; returns it and the output split sizes."""
    first = linears[0]
    sizes = [lin.out_features for lin in linears]
    fused = nn.Linear(first.in_features, sum(sizes), bias=first.bias is not None,
                      device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([lin.weight for lin in linears]))
        if first.bias is not None:
            fused.bias.copy_(torch.cat([lin.bias for lin in linears]))
    return fused.requires_grad_(False), sizes


def position_ids(start_pos: int | torch.Tensor, t: int, device) -> torch.Tensor:
    """Positions of the T input tokens: ``start_pos + arange(T)``, or ``start_pos`` itself when it is
    already a 1-D tensor of T positions (a flat batch of several requests, see ``CausalLM``)."""
    if isinstance(start_pos, torch.Tensor):
        # a 0-dim start stays data (compiled decode): arange(start, ...) would make the length data-dependent
        return start_pos if start_pos.dim() == 1 else start_pos + torch.arange(t, device=device)
    return torch.arange(start_pos, start_pos + t, device=device)


class KVCache(nn.Module):
    """Static cache preallocated to ``max_seq_len``: decode writes in place, never reallocates.

    Attention modules call only ``attend`` (write the new K/V, attend over what is cached), the method
    every cache offers, so a model file works unchanged with the paged cache of ``engine/paged_cache.py``.
    """

    def __init__(self, batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None = None, compute_dtype: torch.dtype | None = None):
        super().__init__()
        shape = (batch, n_kv_heads, max_seq_len, head_dim)
        self.quantized = dtype == torch.int8  # int8 codes + a scale per (position, head): compress/quant/kv.py
        self.compute_dtype = compute_dtype or (torch.float32 if self.quantized else dtype)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        if self.quantized:
            scale_shape = (*shape[:3], 1)
            self.register_buffer("k_scale", torch.zeros(scale_shape, device=device), persistent=False)
            self.register_buffer("v_scale", torch.zeros(scale_shape, device=device), persistent=False)

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[2]

    def update(self, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (B, Hkv, T, D) at [start, start+T) and return what attention should read.

        ``start`` an int (eager): the valid prefix [0, start+T). ``start`` a tensor (compiled decode,
        where positions are data so one graph serves every step): the whole cache, masked by ``attend``.
        """
        if self.quantized:
            return self._update_int8(start, k, v)
        b, t = k.shape[0], k.shape[2]
        if isinstance(start, torch.Tensor):
            pos = start + torch.arange(t, device=k.device)
            self.k[:b].index_copy_(2, pos, k)
            self.v[:b].index_copy_(2, pos, v)
            return self.k[:b], self.v[:b]
        end = start + t
        self.k[:b, :, start:end] = k
        self.v[:b, :, start:end] = v
        return self.k[:b, :, :end], self.v[:b, :, :end]

    def _update_int8(self, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        from miaotui.compress.quant.kv import dequantize_kv, quantize_kv

        b, t = k.shape[0], k.shape[2]
        pos = start + torch.arange(t, device=k.device) if isinstance(start, torch.Tensor) else \
            torch.arange(start, start + t, device=k.device)
        out = []
        for codes, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            q, s = quantize_kv(x)
            codes[:b].index_copy_(2, pos, q)
            scales[:b].index_copy_(2, pos, s)
            end = codes.shape[2] if isinstance(start, torch.Tensor) else start + t
            out.append(dequantize_kv(codes[:b, :, :end], scales[:b, :, :end], self.compute_dtype))
        return out[0], out[1]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int | torch.Tensor,
               window: int | None = None, scale: float | None = None) -> torch.Tensor:
        """Write k/v (B, Hkv, T, D) at [start, start+T), then causal attention of q (B, H, T, D) over
        positions [0, start+T) → (B, H, T, D)."""
        k, v = self.update(start, k, v)
        return attend(q, k, v, start, window, scale)


def attention_mask(t: int, start: int, window: int | None, device) -> torch.Tensor | None:
    """Boolean (T, start+T) mask (True = attend) or None when plain causal suffices."""
    if window is None and (t == 1 or start == 0):
        return None  # decode attends to everything; a fresh prefill uses is_causal
    q_pos = torch.arange(start, start + t, device=device)[:, None]
    k_pos = torch.arange(start + t, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int | torch.Tensor,
           window: int | None = None, scale: float | None = None) -> torch.Tensor:
    """Causal attention. q: (B, H, T, D); k, v: (B, Hkv, S, D) → (B, H, T, D).

    ``start`` an int: S = start + T, the valid prefix. ``start`` a tensor (compiled decode, T = 1):
    S is the whole cache and positions after ``start`` (or outside the window) are masked.
    """
    b, h, t, d = q.shape
    scale = scale if scale is not None else d ** -0.5
    if isinstance(start, torch.Tensor):
        k_pos = torch.arange(k.shape[2], device=q.device)
        keep = k_pos <= start
        if window is not None:
            keep &= k_pos > start - window
        return decode_attention(q, k, v, scale, keep)
    if t == 1:
        if window is not None:  # the newest position sees exactly the last `window` keys
            k, v = k[:, :, -window:], v[:, :, -window:]
        return decode_attention(q, k, v, scale)
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and has_native_bf16():
        return blocked_causal_attention(q, k, v, start, scale, window)  # 2-2.5x SDPA's bf16 kernel here
    mask = attention_mask(t, start, window, q.device)
    causal = mask is None
    gqa = k.shape[1] != h
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     keep: torch.Tensor | None = None) -> torch.Tensor:
    """One query per sequence: two small matmuls beat SDPA's CPU flash kernel ~5x here.

    Query heads sharing a KV head are stacked as rows, so GQA needs no repeated K/V:
    q (B, H, 1, D) → (B, Hkv, G, D) against k (B, Hkv, S, D). ``keep`` (S,), or (B, 1, 1, S) for
    sequences of different lengths, masks cache slots.
    """
    b, h, _, d = q.shape
    q = q.reshape(b, k.shape[1], h // k.shape[1], d)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale  # (B, Hkv, G, S)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).view(b, h, 1, d)


class CausalLM(nn.Module):
    """What every decoder offers the engine.

    ``forward(input_ids (B, T), start_pos) → logits (B, T, V)`` (only the last position when
    ``last_only``). With a cache set up, K/V of positions [start_pos, start_pos+T) are written to it;
    without one, ``start_pos`` must be 0 and attention is over the input alone.

    ``start_pos`` is an int (eager), a 0-dim tensor (compiled decode: one graph for every position) or a
    1-D tensor of T positions: a flat batch of several requests' tokens as input_ids (1, T), which only the
    paged cache can serve (it knows from its step metadata which request each token belongs to).
    ``logit_rows`` (1-D indices along T) keeps just those positions' logits, e.g. the last token of each
    request that samples: the final norm and the output projection run on those rows only.
    """

    # subclasses fill these in
    model_type: str = ""
    max_seq_len: int = 0  # the model's context length
    #: tensor-parallel plan: module-name suffix → "colwise" | "rowwise" | "vocab"
    tp_plan: dict[str, str] = {}
    #: KV cache storage dtype (None: the model's own; torch.int8: quantized, see compress/quant/kv.py)
    kv_cache_dtype: torch.dtype | None = None

    def attention_layers(self) -> list[nn.Module]:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        """Where the model lives (read from its tensors: a quantized head has no ``.weight``)."""
        return next(itertools.chain(self.parameters(), self.buffers())).device

    @property
    def vocab_size(self) -> int:
        return self.lm_head.out_features

    @staticmethod
    def logit_positions(x: torch.Tensor, last_only: bool, logit_rows: torch.Tensor | None) -> torch.Tensor:
        """The hidden states (B, T, C) whose logits ``forward`` returns."""
        if logit_rows is not None:
            return x[:, logit_rows]
        return x[:, -1:] if last_only else x

    def kv_shape(self) -> tuple[int, int]:
        """(n_kv_heads, head_dim) per layer, for cache allocation."""
        raise NotImplementedError

    def setup_cache(self, batch: int, max_seq_len: int | None = None, dtype: torch.dtype | None = None) -> None:
        max_seq_len = min(max_seq_len or self.max_seq_len, self.max_seq_len)
        compute = next(p.dtype for p in self.parameters() if p.is_floating_point())
        dtype = dtype or self.kv_cache_dtype or compute
        n_kv, head_dim = self.kv_shape()
        for layer in self.attention_layers():
            layer.kv_cache = KVCache(batch, n_kv, max_seq_len, head_dim, dtype, self.device, compute)

    def clear_cache(self) -> None:
        for layer in self.attention_layers():
            layer.kv_cache = None

    @property
    def cache_len(self) -> int:
        """Positions the allocated cache can hold (0 when none is set up)."""
        cache = self.attention_layers()[0].kv_cache
        return cache.max_seq_len if cache is not None else 0

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "CausalLM":
        raise NotImplementedError

    @classmethod
    def convert_hf_state_dict(cls, sd: dict[str, torch.Tensor], cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Map a Hugging Face state dict onto this module's names and layouts (identity by default)."""
        return sd

    def init_buffers(self) -> None:
        """(Re)compute non-persistent buffers after the weights were assigned from the meta device."""

    def tie_weights(self) -> None:
        """Share the output projection with the input embedding when the config ties them."""

    def fuse(self) -> None:
        """Concatenate projections that read the same input (q/k/v, gate/up) for faster inference.

        Only plain ``nn.Linear`` layers are fused; compressed or sharded ones are left as they are."""
