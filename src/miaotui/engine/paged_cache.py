"""The paged KV cache: every request's K/V in fixed-size blocks of one per-layer pool, and the attention
that reads them back through block tables.

One engine step runs a *flat batch*: the new tokens of all scheduled requests concatenated as input ids
(1, N) with explicit positions (N,). ``StepBatch`` (built once per step from the ``SchedulerOutput``) says
where each token's K/V goes (the slot mapping) and which request each query row belongs to. Every layer's
``PagedKVCache.attend`` then

1. writes the step's K/V at their slots (so a chunk attends to itself through the cache like to its past),
2. attends all one-token requests (decodes) together: with the native kernel (fp32 cache, CPU) straight from
   the pool through the block tables; otherwise their contexts are gathered block by block into a padded
   (B, Hkv, S, D) batch and masked past each context length (and outside a sliding window),
3. attends each longer prompt chunk on its own with SDPA and a causal mask offset by its start position.

Rows are ordered decodes first, then chunks, so each group is a contiguous slice of the flat batch.

Worked example (block_size 4): request a decodes its 7th token (position 6, block table [3, 9]) while b
runs a prompt chunk at positions 4..7 (block table [5, 2]). Flat batch rows: [a@6, b@4, b@5, b@6, b@7];
slot mapping [9*4+2, 2*4+0, 2*4+1, 2*4+2, 2*4+3]. a attends slots of blocks [3, 9] masked to 7 positions;
b attends blocks [5, 2] (8 positions) with query i seeing keys [0, 4+i].
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from miaotui import kernels
from miaotui.engine.scheduler import SchedulerOutput
from miaotui.models import CausalLM
from miaotui.models.base import attend, decode_attention


@dataclass
class DecodeGroup:
    """The step's one-token requests, attended in one padded batch; they are rows [0, size)."""

    block_tables: torch.Tensor  # (B, max_blocks) block ids covering each context, padded with block 0
    context_lens: torch.Tensor  # (B,) positions each query attends: its own position + 1
    block_size: int
    _keep: dict[int | None, torch.Tensor] = field(default_factory=dict, repr=False)
    _rows: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def size(self) -> int:
        return self.block_tables.shape[0]

    @property
    def padded_len(self) -> int:
        return self.block_tables.shape[1] * self.block_size

    def gather_rows(self, n_kv_heads: int) -> torch.Tensor:
        """(B * Hkv * S,) rows of a pool viewed as (slots * Hkv, D) that, gathered in order, form the padded
        contexts as (B, Hkv, S, D): the layout the attention matmuls read without another copy."""
        if n_kv_heads not in self._rows:
            bs = self.block_size
            offsets = torch.arange(bs, device=self.block_tables.device)
            slots = (self.block_tables[:, :, None] * bs + offsets).flatten(1)  # (B, S)
            heads = torch.arange(n_kv_heads, device=slots.device)
            self._rows[n_kv_heads] = (slots[:, None, :] * n_kv_heads + heads[:, None]).reshape(-1)
        return self._rows[n_kv_heads]

    def keep(self, window: int | None) -> torch.Tensor:
        """(B, 1, 1, S) True where a slot holds a key the query sees; built once per step and window."""
        if window not in self._keep:
            k_pos = torch.arange(self.padded_len, device=self.context_lens.device)
            ctx = self.context_lens[:, None]
            keep = k_pos < ctx
            if window is not None:  # the query at ctx - 1 sees the last `window` keys
                keep &= k_pos >= ctx - window
            self._keep[window] = keep[:, None, None, :]
        return self._keep[window]


@dataclass(frozen=True)
class PrefillChunk:
    """A run of >= 2 tokens of one request: rows [row, row + num_tokens) at positions [start_pos, ...)."""

    row: int
    num_tokens: int
    start_pos: int
    blocks: torch.Tensor | None  # block ids covering [0, context_len); None when start_pos == 0

    @property
    def context_len(self) -> int:
        return self.start_pos + self.num_tokens


@dataclass
class StepBatch:
    """Everything one forward over the paged cache needs, as tensors on the model's device."""

    input_ids: torch.Tensor  # (1, N)
    positions: torch.Tensor  # (N,)
    slot_mapping: torch.Tensor  # (N,) flat cache slot of each token's K/V
    logit_rows: torch.Tensor  # (R,) the last row of each request that samples
    sample_ids: list[str]  # request id of each logit row, in order
    decodes: DecodeGroup | None
    chunks: list[PrefillChunk]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    @classmethod
    def build(cls, out: SchedulerOutput, device: torch.device | str = "cpu") -> "StepBatch":
        bs = out.block_size
        decodes = [s for s in out.scheduled if s.num_tokens == 1]
        longer = [s for s in out.scheduled if s.num_tokens > 1]
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logit_rows: list[int] = []
        sample_ids: list[str] = []
        chunks: list[PrefillChunk] = []
        for s in decodes + longer:
            row = len(ids)
            ids.extend(s.token_ids)
            positions.extend(s.positions)
            slots.extend(s.slot_mapping(bs))
            if s.sample:
                logit_rows.append(len(ids) - 1)
                sample_ids.append(s.request_id)
            if s.num_tokens > 1:
                blocks = None
                if s.start_pos > 0:
                    blocks = torch.tensor(s.block_table[:-(-s.context_len // bs)], device=device)
                chunks.append(PrefillChunk(row, s.num_tokens, s.start_pos, blocks))
        group = None
        if decodes:
            widths = [-(-s.context_len // bs) for s in decodes]
            width = max(widths)
            tables = [s.block_table[:w] + [0] * (width - w) for s, w in zip(decodes, widths)]
            group = DecodeGroup(torch.tensor(tables, device=device),
                                torch.tensor([s.context_len for s in decodes], device=device), bs)

        def as_tensor(xs: list[int]) -> torch.Tensor:
            return torch.tensor(xs, dtype=torch.long, device=device)

        return cls(as_tensor(ids)[None], as_tensor(positions), as_tensor(slots), as_tensor(logit_rows),
                   sample_ids, group, chunks)


class Scratch:
    """Grow-only buffers for the gathered decode contexts, shared by all layers (they run one after another).

    A fresh multi-megabyte tensor per layer costs more in page faults than the gather itself (measured
    ~8x slower for 16 requests × 672 positions), so the gathers write into these instead."""

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        n = math.prod(shape)
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._bufs[name] = torch.empty(n, dtype=like.dtype, device=like.device)
        return buf[:n].view(shape)


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor:
    """Zeros that cost memory only where written. On the CPU an anonymous mapping: the OS hands out zero
    pages on first touch, so a cache sized for the worst case holds only the blocks in use in RAM
    (``torch.zeros`` writes, and so keeps resident, every byte), and unmaps it when the tensor dies."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    cpu = torch.device(device if device is not None else "cpu").type == "cpu"
    if not cpu or nbytes == 0 or not hasattr(mmap, "MAP_PRIVATE"):  # a GPU, or Windows: plain zeros
        return torch.zeros(shape, dtype=dtype, device=device)
    # private: reads of untouched pages map the kernel's zero page (a shared mapping would allocate them),
    # and a forked process does not see this one's writes
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # the tensor holds a reference to the mapping (page-aligned, so also 64-byte aligned for the kernels)
    return torch.frombuffer(buf, dtype=dtype).view(shape)


class PagedKVCache(nn.Module):
    """One layer's K and V pools, (num_blocks * block_size, Hkv, D) each; ``step`` is set per forward."""

    def __init__(self, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None = None, scratch: Scratch | None = None,
                 compute_dtype: torch.dtype | None = None):
        super().__init__()
        shape = (num_blocks * block_size, n_kv_heads, head_dim)
        # zeros, not empty: padded slots are masked, but 0 * NaN garbage would still poison probs @ V
        self.register_buffer("k", lazy_zeros(shape, dtype, device), persistent=False)
        self.register_buffer("v", lazy_zeros(shape, dtype, device), persistent=False)
        self.quantized = dtype == torch.int8  # int8 codes + one scale per (slot, head)
        self.compute_dtype = compute_dtype or (torch.float32 if self.quantized else dtype)
        if self.quantized:
            self.register_buffer("k_scale", lazy_zeros((*shape[:2], 1), torch.float32, device), persistent=False)
            self.register_buffer("v_scale", lazy_zeros((*shape[:2], 1), torch.float32, device), persistent=False)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.scratch = scratch or Scratch()
        self.step: StepBatch | None = None
        self.native: bool | None = None  # decided at the first decode (see _native_decode)

    def _native_decode(self, q: torch.Tensor) -> bool:
        """Whether the decode group runs the native paged kernel: fp32 cache and queries on the CPU, head_dim a
        multiple of 8, kernels built (``MIAOTUI_NATIVE=0`` keeps the gather + matmul path)."""
        if self.native is None:
            self.native = (self.k.device.type == "cpu" and self.k.dtype == torch.float32
                           and self.k.shape[-1] % 8 == 0 and kernels.available())
        return self.native and q.dtype == torch.float32 and not q.requires_grad

    def _gather_decode(self, pool: torch.Tensor, g: DecodeGroup, name: str) -> torch.Tensor:
        """The decode group's contexts from ``pool`` as (B, Hkv, S, D), in a scratch buffer."""
        _, hkv, d = pool.shape
        rows = g.gather_rows(hkv)
        out = self.scratch.get(name, (rows.numel(), d), pool)
        torch.index_select(pool.view(-1, d), 0, rows, out=out)
        if self.quantized:
            from miaotui.compress.quant.kv import dequantize_kv

            scales = getattr(self, f"{name}_scale").view(-1, 1)[rows]
            return dequantize_kv(out, scales, self.compute_dtype).view(g.size, hkv, g.padded_len, d)
        return out.view(g.size, hkv, g.padded_len, d)

    def _blocks(self, pool: torch.Tensor, blocks: torch.Tensor, name: str) -> torch.Tensor:
        """Gather whole blocks: (nb,) → (nb * block_size, Hkv, D)."""
        _, hkv, d = pool.shape
        out = pool.view(self.num_blocks, self.block_size, hkv, d)[blocks].flatten(0, 1)
        if self.quantized:
            from miaotui.compress.quant.kv import dequantize_kv

            scales = getattr(self, f"{name}_scale").view(self.num_blocks, self.block_size, hkv, 1)[blocks]
            return dequantize_kv(out, scales.flatten(0, 1), self.compute_dtype)
        return out

    def _write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k/v (N, Hkv, D) into their slots."""
        if not self.quantized:
            self.k.index_copy_(0, slots, k)
            self.v.index_copy_(0, slots, v)
            return
        from miaotui.compress.quant.kv import quantize_kv

        for codes, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            q, s = quantize_kv(x)
            codes.index_copy_(0, slots, q)
            scales.index_copy_(0, slots, s)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor,
               window: int | None = None, scale: float | None = None) -> torch.Tensor:
        """q (1, H, N, D), k/v (1, Hkv, N, D) of the step's flat batch → attention output (1, H, N, D).

        ``start`` (the positions) is unused: the step's metadata already places every token.
        """
        step = self.step
        assert step is not None and q.shape[0] == 1, "the paged cache runs a flat batch set up by the engine"
        scale = scale if scale is not None else q.shape[-1] ** -0.5
        self._write(step.slot_mapping, k[0].transpose(0, 1), v[0].transpose(0, 1))
        parts = []
        if step.decodes is not None and self._native_decode(q):  # straight from the pool, no gathered copy
            g = step.decodes
            yd = kernels.paged_decode_attention(q[0, :, :g.size].transpose(0, 1), self.k, self.v, g.block_tables,
                                                g.context_lens, self.block_size, scale, window)  # (B, H, D)
            parts.append(yd.transpose(0, 1).unsqueeze(0))  # (1, H, B, D)
        elif step.decodes is not None:
            g = step.decodes
            qd = q[0, :, :g.size].transpose(0, 1).unsqueeze(2)  # (B, H, 1, D)
            kd = self._gather_decode(self.k, g, "k")  # (B, Hkv, S, D)
            vd = self._gather_decode(self.v, g, "v")
            yd = decode_attention(qd, kd, vd, scale, g.keep(window))  # (B, H, 1, D)
            parts.append(yd[:, :, 0].transpose(0, 1).unsqueeze(0))  # (1, H, B, D)
        for c in step.chunks:
            rows = slice(c.row, c.row + c.num_tokens)
            if c.blocks is None:  # a fresh prompt: its context is exactly the new K/V
                kc, vc = k[:, :, rows], v[:, :, rows]
            else:  # (1, Hkv, context_len, D), the chunk's own K/V included
                kc = self._blocks(self.k, c.blocks, "k")[:c.context_len].transpose(0, 1)[None]
                vc = self._blocks(self.v, c.blocks, "v")[:c.context_len].transpose(0, 1)[None]
            parts.append(attend(q[:, :, rows], kc, vc, c.start_pos, window, scale))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def kv_block_bytes(model: CausalLM, block_size: int, dtype: torch.dtype | None = None) -> int:
    """Bytes of K and V one block takes over all layers."""
    n_kv, head_dim = model.kv_shape()
    dtype = dtype or model.kv_cache_dtype or next(model.parameters()).dtype
    elem = torch.empty((), dtype=dtype).element_size()
    per_slot_head = head_dim * elem + (4 if dtype == torch.int8 else 0)  # int8 adds an fp32 scale
    return 2 * len(model.attention_layers()) * block_size * n_kv * per_slot_head


class PagedKVPool:
    """The paged caches of all layers of one model; ``bound`` lends them to the model for one forward."""

    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, dtype: torch.dtype | None = None):
        n_kv, head_dim = model.kv_shape()
        compute = next(p.dtype for p in model.parameters() if p.is_floating_point())
        dtype = dtype or model.kv_cache_dtype or compute
        self.num_blocks, self.block_size = num_blocks, block_size
        scratch = Scratch()
        self.layers = [PagedKVCache(num_blocks, block_size, n_kv, head_dim, dtype, model.device, scratch, compute)
                       for _ in model.attention_layers()]

    @property
    def nbytes(self) -> int:
        return sum(c.k.nbytes + c.v.nbytes + (c.k_scale.nbytes + c.v_scale.nbytes if c.quantized else 0)
                   for c in self.layers)

    @contextmanager
    def bound(self, model: CausalLM, step: StepBatch) -> Iterator[None]:
        """Install the paged caches with ``step``'s metadata, and put the model's own caches back after,
        so the same model keeps serving the single-sequence path (static cache, compiled decode)."""
        layers = model.attention_layers()
        saved = [layer.kv_cache for layer in layers]
        for layer, cache in zip(layers, self.layers):
            cache.step = step
            layer.kv_cache = cache
        try:
            yield
        finally:
            for layer, cache, old in zip(layers, self.layers, saved):
                layer.kv_cache = old
                cache.step = None
