"""Structured pruning of BERT-family encoders: the ``prune-heads`` / ``prune-channels`` / ``prune-layers``
steps when the model is a ``BertEncoder``, cutting through ``encoder/prune.py`` and scored on calibration
texts (the lines of ``--calib FILE``, else the data-free seed prompts)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from miaotui.compress.prune.structured import (
    ChannelContribution, _fraction_param, _int_param, _record_shape, channels_to_keep, count_params, slice_linear,
)
from miaotui.compress.recipe import Context, RecipeError
from miaotui.encoder.quantize import calibration_texts

def _encode_with_hooks(ctx: Context, hooks: list[tuple[nn.Module, str, Any]]) -> None:
    """One pass of the calibration texts through the encoder with ``(module, "pre"|"post", fn)`` hooks."""
    from miaotui.encoder.api import Encoder

    handles = [m.register_forward_pre_hook(fn) if kind == "pre" else m.register_forward_hook(fn)
               for m, kind, fn in hooks]
    try:
        Encoder(ctx.loaded).encode(calibration_texts(ctx))
    finally:
        for h in handles:
            h.remove()


def encoder_prune_heads(ctx: Context, params: dict[str, Any]) -> dict[str, Any]:
    """``{heads: N}`` or ``{fraction: F}`` removed from every layer of a BERT-family encoder.

    The config's ``num_attention_heads`` is left as it is: ``BertArgs`` derives head_dim from it."""
    from miaotui.encoder.api import Encoder
    from miaotui.encoder.prune import head_importance, heads_of, prune_heads as cut_heads

    model = ctx.loaded.model
    n = heads_of(model.layers[0].attention)
    count, frac = _int_param("prune-heads", params, "heads", lo=1), _fraction_param("prune-heads", params)
    if (count is None) == (frac is None):
        raise RecipeError("prune-heads: for an encoder give exactly one of heads (per layer) or fraction")
    count = count if count is not None else round(frac * n)
    if not 1 <= count < n:
        raise RecipeError(f"prune-heads: can remove 1..{n - 1} of the {n} heads per layer, not {count}")
    before = count_params(model)
    imp = head_importance(Encoder(ctx.loaded), calibration_texts(ctx))
    drop = {li: sorted(torch.argsort(row, stable=True)[:count].tolist()) for li, row in enumerate(imp)}
    cut_heads(model, drop)
    return {"heads": [n, n - count], "dropped": [drop[i] for i in range(len(drop))],
            "params_removed": before - count_params(model)}


def encoder_prune_channels(ctx: Context, params: dict[str, Any]) -> dict[str, Any]:
    model = ctx.loaded.model
    inter = model.layers[0].output.in_features
    keep = channels_to_keep("prune-channels", params, inter)
    stats = [ChannelContribution(layer.output.weight) for layer in model.layers]
    _encode_with_hooks(ctx, [(layer.output, "pre", lambda m, a, s=s: s.add(a[0].reshape(-1, a[0].shape[-1])))
                             for layer, s in zip(model.layers, stats)])
    before = count_params(model)
    for layer, s in zip(model.layers, stats):
        idx = torch.sort(torch.topk(s.scores(), keep).indices).values
        layer.intermediate = slice_linear(layer.intermediate, idx)
        layer.output = slice_linear(layer.output, cols=idx)
    _record_shape(ctx, intermediate_size=keep)
    return {"intermediate_size": [inter, keep], "params_removed": before - count_params(model)}


def encoder_prune_layers(ctx: Context, count: int, method: str, explicit: list[int] | None) -> dict[str, Any]:
    from miaotui.encoder.prune import drop_layers as keep_layers

    model = ctx.loaded.model
    n = len(model.layers)
    before = count_params(model)
    scores = None
    if explicit is not None:
        drop = sorted(set(explicit))
    else:
        block = count if method == "angular" else 1
        bounds: list[list[torch.Tensor]] = [[] for _ in range(n + 1)]  # hidden states (N, C) at each boundary

        def keep_state(i: int, first: bool):
            def fn(module, args, out):
                if first:
                    bounds[0].append(args[0].float())
                bounds[i + 1].append(out.float())
            return fn

        _encode_with_hooks(ctx, [(layer, "post", keep_state(i, i == 0)) for i, layer in enumerate(model.layers)])
        xs = [torch.cat(b) for b in bounds]
        cos = [torch.nn.functional.cosine_similarity(xs[i].double(), xs[i + block].double(), dim=-1)
               for i in range(n - block + 1)]
        scores = torch.stack([torch.arccos(c.clamp(-1, 1)).mean() / math.pi for c in cos]).float()
        if method == "angular":
            start = int(torch.argmin(scores))
            drop = list(range(start, start + count))
        else:
            drop = sorted(torch.argsort(scores, stable=True)[:count].tolist())
    keep_layers(model, [i for i in range(n) if i not in set(drop)])
    _record_shape(ctx, num_hidden_layers=n - count)
    record = {"method": method if explicit is None else "explicit", "dropped": drop,
              "num_hidden_layers": [n, n - count], "params_removed": before - count_params(model)}
    if scores is not None:
        record["distances"] = [round(x, 5) for x in scores.tolist()]
    return record
