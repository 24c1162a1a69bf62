"""Structured pruning of an encoder, in place: drop whole layers, remove attention heads.

Both shrink the weights themselves (nothing is masked), so the pruned model is smaller and faster with the
same code: the attention module reads its head count from the weight shapes. Recovering quality is
distillation's job (against the original's embeddings); saving goes through the compress checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from miaotui.models.bert import BertEncoder, SelfAttention


def evenly_spaced(n_layers: int, n_keep: int) -> list[int]:
    """Which layers to keep so the survivors span the stack, first and last included: (6, 3) → [0, 2, 5]."""
    if not 1 <= n_keep <= n_layers:
        raise ValueError(f"can keep 1..{n_layers} layers, not {n_keep}")
    if n_keep == 1:
        return [n_layers - 1]
    return sorted({round(i * (n_layers - 1) / (n_keep - 1)) for i in range(n_keep)})


def drop_layers(model: BertEncoder, keep: Sequence[int]) -> BertEncoder:
    """Keep only the layers ``keep`` (indices into the current stack), in their order."""
    if not keep or sorted(set(keep)) != list(keep) or keep[-1] >= len(model.layers):
        raise ValueError(f"keep must be increasing layer indices below {len(model.layers)}, got {list(keep)}")
    model.layers = nn.ModuleList(model.layers[i] for i in keep)
    model.args.num_hidden_layers = len(keep)
    return model


def _rows(attn: SelfAttention, keep_heads: list[int]) -> torch.Tensor:
    d = attn.head_dim
    return torch.cat([torch.arange(h * d, (h + 1) * d) for h in keep_heads]) if keep_heads else torch.zeros(0, dtype=torch.long)


def _slice_linear(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    w = lin.weight if rows is None else lin.weight[rows]
    w = w if cols is None else w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if lin.bias is not None:
            new.bias.copy_(lin.bias if rows is None else lin.bias[rows])
    return new.requires_grad_(False)


def heads_of(attn: SelfAttention) -> int:
    width = attn.qkv.out_features // 3 if attn.qkv is not None else attn.query.out_features
    return width // attn.head_dim


def prune_heads(model: BertEncoder, heads: dict[int, Iterable[int]]) -> BertEncoder:
    """Remove attention heads: ``{layer: [head, ...]}``, head indices as the layer has them now.

    Cuts that head's rows from q, k and v (fused or not) and its columns from the output projection."""
    for li, drop in heads.items():
        attn = model.layers[li].attention
        n = heads_of(attn)
        drop = set(drop)
        if not drop <= set(range(n)):
            raise ValueError(f"layer {li} has heads 0..{n - 1}; cannot remove {sorted(drop)}")
        cols = _rows(attn, [h for h in range(n) if h not in drop])
        if attn.qkv is not None:  # q, k and v sit one after the other in the fused weight
            width = n * attn.head_dim
            attn.qkv = _slice_linear(attn.qkv, torch.cat([cols, cols + width, cols + 2 * width]))
            attn.qkv_split = [len(cols)] * 3
        else:
            attn.query, attn.key, attn.value = (_slice_linear(m, cols) for m in (attn.query, attn.key, attn.value))
        attn.out = _slice_linear(attn.out, cols=cols)
    return model


@torch.inference_mode()
def head_importance(encoder, texts: list[str], batch_size: int = 32) -> torch.Tensor:
    """(layers, heads): the mean norm of each head's contribution to its layer's output, per token, on
    ``texts`` (an ``Encoder``'s calibration set). Gradient-free; a head with a small contribution is the
    cheapest to remove."""
    model: BertEncoder = encoder.model
    totals = [torch.zeros(heads_of(layer.attention)) for layer in model.layers]
    tokens = [0]

    def hook(li):
        def fn(module, inputs):
            (y,) = inputs  # (N, W): the heads' outputs, concatenated, before the output projection
            attn = model.layers[li].attention
            d, n = attn.head_dim, y.shape[1] // attn.head_dim
            w = module.weight.float().view(module.out_features, n, d)  # (C, H, D)
            contrib = torch.einsum("nhd,chd->nhc", y.float().view(-1, n, d), w)  # (N, H, C)
            totals[li] += contrib.norm(dim=-1).sum(0)
            if li == 0:
                tokens[0] += y.shape[0]
        return fn

    handles = [layer.attention.out.register_forward_pre_hook(hook(i)) for i, layer in enumerate(model.layers)]
    try:
        encoder.encode(texts, batch_size=batch_size)
    finally:
        for h in handles:
            h.remove()
    width = max(len(t) for t in totals)
    out = torch.full((len(totals), width), float("nan"))
    for i, t in enumerate(totals):
        out[i, :len(t)] = t / max(tokens[0], 1)
    return out


def least_important_heads(importance: torch.Tensor, fraction: float) -> dict[int, list[int]]:
    """The ``fraction`` of all heads with the lowest importance, as ``prune_heads`` takes them
    (at least one head is kept per layer)."""
    flat = [(v, li, h) for li, row in enumerate(importance.tolist()) for h, v in enumerate(row) if v == v]
    n_drop = int(len(flat) * fraction)
    per_layer = {li: sum(1 for _, l2, _ in flat if l2 == li) for li in range(importance.shape[0])}
    out: dict[int, list[int]] = {}
    for _, li, h in sorted(flat):
        if n_drop == 0:
            break
        if per_layer[li] - len(out.get(li, [])) > 1:
            out.setdefault(li, []).append(h)
            n_drop -= 1
    return {li: sorted(hs) for li, hs in out.items()}
