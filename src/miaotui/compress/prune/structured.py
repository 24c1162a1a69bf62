"""Structured pruning: remove attention heads, MLP channels or whole layers, so the tensors themselves shrink.

Nothing is masked: the pruned model is the normal model with smaller shapes, rebuilt by ``load()`` from its
``config.json`` like any other. To keep that config uniform (the engine, the paged KV cache, tensor parallel
and the checkpoint then need no special case), every layer loses the *same number* of heads / channels,
chosen per layer by a score measured on calibration data:

- heads: a query head's score is the mean norm of its contribution to the attention output (its slice of
  ``o_proj`` applied to its attention output); GQA-aware: ``heads_per_group`` query heads go from every KV
  group (SmolLM2's 9 q / 3 kv → 6 q / 3 kv with 1) and/or ``kv_groups`` whole KV heads with all their query
  heads, scored by the norm of the group's summed contribution.
- channels: ``rms(activation_j) · ||down_proj[:, j]||``, the root-mean-square norm of channel j's
  contribution to the MLP output (Wanda's |W|·||X|| at the granularity of a channel).
- layers: block influence (ShortGPT, Men et al. 2024): how far each layer turns its hidden states (angular
  distance between input and output, which ranks like ShortGPT's 1 - cos); or ``method: angular`` (Gromov
  et al. 2024): the contiguous block of n layers whose input and output are closest in angle.

Heads and channels run layer by layer (``layerwise.layer_by_layer``): layer i is scored on inputs that already
went through the pruned layers < i. With ``refit: true`` the projection reading the cut heads / channels
(o_proj, down_proj) is re-fitted by least squares on the kept ones (``refit_columns``), so the layer's output
on the calibration data moves as little as possible; without it the result equals masking them in the dense
model. Encoders (``BertEncoder``) go through ``encoder/prune.py``.

    ctx = Context(load(None)); run_recipe(ctx, {"steps": [{"prune-channels": {"fraction": 0.25}},
                                                         {"prune-heads": {"heads_per_group": 1}}]})
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from miaotui.compress.recipe import Context, RecipeError
from miaotui.encoder.prune import _slice_linear as slice_linear

# ---- parameters


def _check_params(step: str, params: dict[str, Any], allowed: set[str]) -> None:
    unknown = set(params) - allowed
    if unknown:
        raise RecipeError(f"{step}: unknown parameter(s) {', '.join(sorted(unknown))} "
                          f"(allowed: {', '.join(sorted(allowed))})")


def _int_param(step: str, params: dict[str, Any], name: str, lo: int = 0) -> int | None:
    v = params.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise RecipeError(f"{step}: {name} must be an integer >= {lo}, got {v!r}")
    return v


def _bool_param(step: str, params: dict[str, Any], name: str) -> bool:
    v = params.get(name, False)
    if not isinstance(v, bool):
        raise RecipeError(f"{step}: {name} must be true or false, got {v!r}")
    return v


def _fraction_param(step: str, params: dict[str, Any], name: str = "fraction") -> float | None:
    v = params.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
        raise RecipeError(f"{step}: {name} must be a number in [0, 1), got {v!r}")
    return float(v)


# ---- what one architecture looks like to the pruner


def _arch(model: nn.Module) -> str:
    from miaotui.models.bert import BertEncoder
    from miaotui.models.gpt2 import GPT2LMHeadModel
    from miaotui.models.llama import LlamaForCausalLM

    for cls, name in ((LlamaForCausalLM, "llama"), (GPT2LMHeadModel, "gpt2"), (BertEncoder, "bert")):
        if isinstance(model, cls):
            return name
    raise RecipeError(f"structured pruning does not know {type(model).__name__} (llama, mistral, qwen2, gpt2, "
                      "bert-family encoders)")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers if _arch(model) == "llama" else model.transformer.h


def _dense(*linears: nn.Module) -> None:
    for lin in linears:
        if not isinstance(lin, nn.Linear):
            raise RecipeError(f"structured pruning needs dense nn.Linear projections, found {type(lin).__name__}: "
                              "prune before quantize/lowrank in the recipe")


def _sync_args(model: nn.Module, **changes: Any) -> None:
    """Keep the model's own args dataclass in step with the config written for the checkpoint."""
    for k, v in changes.items():
        if hasattr(model.args, k):
            setattr(model.args, k, v)


def _record_shape(ctx: Context, **changes: Any) -> None:
    ctx.update_config(**changes)
    _sync_args(ctx.loaded.model, **changes)


def _head_cols(heads: list[int], d: int) -> torch.Tensor:
    """Indices of the ``d``-wide slices of ``heads`` in a concatenation of heads."""
    if not heads:
        return torch.zeros(0, dtype=torch.long)
    return (torch.tensor(heads)[:, None] * d + torch.arange(d)).reshape(-1)


def count_params(model: nn.Module) -> int:
    """Parameters, each shared tensor once (a tied head is the embedding)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@torch.no_grad()
def refit_columns(lin: nn.Linear, gram: torch.Tensor, keep: torch.Tensor, damp: float = 0.01) -> None:
    """Least-squares re-fit of the kept input columns of ``lin`` so that, on the calibration inputs X
    (``gram`` = XᵀX), W'·x_kept best reproduces W·x: W'_k = W·H[:, k]·H_kk⁻¹ (= W_k + W_d·H_dk·H_kk⁻¹).
    The dropped columns are left as they are (the caller cuts them). ``damp`` × mean diagonal regularises
    H_kk as in GPTQ."""
    h = gram.double()
    hk = h[keep][:, keep]
    hk += damp * hk.diagonal().mean().clamp_min(1e-12) * torch.eye(len(keep), dtype=h.dtype)
    w = lin.weight.double()
    rhs = w @ h[:, keep]  # (out, k)
    lin.weight[:, keep] = torch.linalg.solve(hk, rhs.T).T.to(lin.weight.dtype)  # H_kk symmetric


# ---- heads


@dataclass
class HeadShape:
    n_q: int
    n_kv: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.n_q // self.n_kv


def head_shape(attn: nn.Module) -> HeadShape:
    """Query heads, KV heads and head_dim of a llama or GPT-2 attention module, read from its weights."""
    d = attn.head_dim
    if hasattr(attn, "c_attn"):  # GPT-2: multi-head, q|k|v fused in thirds
        n = attn.c_attn.out_features // 3 // d
        return HeadShape(n, n, d)
    if attn.qkv_proj is not None:
        q, k, _ = attn.qkv_split
        return HeadShape(q // d, k // d, d)
    return HeadShape(attn.q_proj.out_features // d, attn.k_proj.out_features // d, d)


def out_proj(attn: nn.Module) -> nn.Linear:
    return attn.c_proj if hasattr(attn, "c_attn") else attn.o_proj


class HeadContribution:
    """Per query head: sum over tokens of ||y_h W_o[:, h]ᵀ|| (its share of the attention output), and the
    same norm for each KV group's summed contribution. Fed the input of the output projection, (rows, H*D)."""

    def __init__(self, o_weight: torch.Tensor, shape: HeadShape):
        self.shape = shape
        c = o_weight.shape[0]
        self.w = o_weight.detach().float().view(c, shape.n_q, shape.head_dim)  # (C, H, D)
        self.head = torch.zeros(shape.n_q, dtype=torch.float64)
        self.group = torch.zeros(shape.n_kv, dtype=torch.float64)
        self.n = 0

    def add(self, y: torch.Tensor) -> None:
        s = self.shape
        y = y.float().view(-1, s.n_q, s.head_dim)
        contrib = torch.einsum("nhd,chd->nhc", y, self.w)  # (N, H, C)
        self.head += contrib.norm(dim=-1).sum(0, dtype=torch.float64)
        grouped = contrib.view(y.shape[0], s.n_kv, s.group, -1).sum(2)  # (N, Hkv, C)
        self.group += grouped.norm(dim=-1).sum(0, dtype=torch.float64)
        self.n += y.shape[0]

    def scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(per query head, per KV group) mean contribution norms."""
        n = max(self.n, 1)
        return (self.head / n).float(), (self.group / n).float()


def select_heads(head_score: torch.Tensor, group_score: torch.Tensor, n_kv: int, heads_per_group: int,
                 kv_groups: int) -> tuple[list[int], list[int]]:
    """(query heads to keep, KV heads to keep), both sorted: the ``kv_groups`` lowest-scoring groups go
    whole, then the ``heads_per_group`` lowest-scoring query heads of every remaining group.

    >>> select_heads(torch.tensor([3., 1, 2, 9, 8, 7]), torch.tensor([5., 9]), 2, 1, 0)
    ([0, 2, 3, 4], [0, 1])
    """
    n_q = head_score.numel()
    group = n_q // n_kv
    if not 0 <= kv_groups < n_kv:
        raise ValueError(f"can remove 0..{n_kv - 1} of {n_kv} KV groups, not {kv_groups}")
    if not 0 <= heads_per_group < group:
        raise ValueError(f"can remove 0..{group - 1} of the {group} query heads per KV group, not {heads_per_group}")
    drop_groups = set(torch.argsort(group_score, stable=True)[:kv_groups].tolist())
    keep_kv = [g for g in range(n_kv) if g not in drop_groups]
    keep_q = []
    for g in keep_kv:
        members = torch.arange(g * group, (g + 1) * group)
        order = torch.argsort(head_score[members], stable=True)
        keep_q += sorted(members[order[heads_per_group:]].tolist())
    return keep_q, keep_kv


def prune_layer_heads(attn: nn.Module, keep_q: list[int], keep_kv: list[int]) -> None:
    """Cut an attention module down to query heads ``keep_q`` and KV heads ``keep_kv`` (sorted indices).

    Query head h reads KV head h // group; every kept KV head must keep the same number of its query heads,
    so that after the cut new query head j still reads new KV head j // new_group."""
    s = head_shape(attn)
    per_group = len(keep_q) // max(len(keep_kv), 1)
    owners = [h // s.group for h in keep_q]
    if (not keep_kv or sorted(set(keep_q)) != keep_q or sorted(set(keep_kv)) != keep_kv
            or owners != [g for g in keep_kv for _ in range(per_group)]):
        raise ValueError(f"heads {keep_q} / KV heads {keep_kv} do not keep the same number of query heads in "
                         f"every kept group (group size {s.group})")
    d = s.head_dim
    q_cols, kv_cols = _head_cols(keep_q, d), _head_cols(keep_kv, d)
    if hasattr(attn, "c_attn"):  # GPT-2: MHA, keep_q == keep_kv
        _dense(attn.c_attn, attn.c_proj)
        w = s.n_q * d
        attn.c_attn = slice_linear(attn.c_attn, torch.cat([q_cols, q_cols + w, q_cols + 2 * w]))
        attn.c_proj = slice_linear(attn.c_proj, cols=q_cols)
        return
    if attn.qkv_proj is not None:
        _dense(attn.qkv_proj, attn.o_proj)
        q, k, _ = attn.qkv_split
        attn.qkv_proj = slice_linear(attn.qkv_proj, torch.cat([q_cols, q + kv_cols, q + k + kv_cols]))
        attn.qkv_split = [len(q_cols), len(kv_cols), len(kv_cols)]
    else:
        _dense(attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
        attn.q_proj = slice_linear(attn.q_proj, q_cols)
        attn.k_proj, attn.v_proj = slice_linear(attn.k_proj, kv_cols), slice_linear(attn.v_proj, kv_cols)
    attn.o_proj = slice_linear(attn.o_proj, cols=q_cols)
    attn.n_heads, attn.n_kv = len(keep_q), len(keep_kv)


@dataclass
class HeadPlan:
    """One layer's cut: which heads stay, and the scores that chose them."""

    keep_q: list[int]
    keep_kv: list[int]
    head_score: list[float]
    group_score: list[float]


@torch.no_grad()
def prune_heads(model: nn.Module, ids: torch.Tensor, heads_per_group: int = 0, kv_groups: int = 0,
                progress: bool = True, refit: bool = False) -> list[HeadPlan]:
    """Remove ``kv_groups`` KV groups and ``heads_per_group`` query heads per remaining group from every
    layer of a llama / GPT-2 decoder, chosen on calibration ids (N, T); returns each layer's plan.
    ``refit``: re-fit the output projection on the kept heads (``refit_columns``)."""
    from miaotui.compress.layerwise import HessianStat, layer_by_layer

    model.clear_cache()
    plans = []
    for calib in layer_by_layer(model, ids, progress=progress, desc="prune heads"):
        layer = calib.layer
        attn = layer.self_attn if hasattr(layer, "self_attn") else layer.attn
        shape = head_shape(attn)
        stat = HeadContribution(out_proj(attn).weight, shape)
        name = "self_attn.o_proj" if hasattr(layer, "self_attn") else "attn.c_proj"
        gram = HessianStat(shape.n_q * shape.head_dim) if refit else None
        calib.capture({name: (stat, gram) if refit else stat})
        hs, gs = stat.scores()
        keep_q, keep_kv = select_heads(hs, gs, shape.n_kv, heads_per_group, kv_groups)
        if refit:
            refit_columns(out_proj(attn), gram.h, _head_cols(keep_q, shape.head_dim))
        prune_layer_heads(attn, keep_q, keep_kv)
        plans.append(HeadPlan(keep_q, keep_kv, [round(x, 5) for x in hs.tolist()], [round(x, 5) for x in gs.tolist()]))
        calib.advance()  # the next layer is scored on this pruned layer's outputs
    return plans


def _heads_to_remove(step: str, p: dict[str, Any], shape: HeadShape) -> tuple[int, int]:
    """(heads_per_group, kv_groups) from the step's parameters, checked against the model's heads."""
    hpg = _int_param(step, p, "heads_per_group") or 0
    kvg = _int_param(step, p, "kv_groups") or 0
    frac = _fraction_param(step, p)
    if frac is not None:
        if hpg or kvg:
            raise RecipeError(f"{step}: give fraction, or heads_per_group / kv_groups, not both")
        # a fraction of query heads: from within each KV group when there are groups (GQA), else whole heads
        if shape.group > 1:
            hpg = round(frac * shape.group)
        else:
            kvg = round(frac * shape.n_kv)
    if not hpg and not kvg:
        raise RecipeError(f"{step}: nothing to remove: give heads_per_group, kv_groups or fraction (> 0)")
    if hpg >= shape.group:
        raise RecipeError(f"{step}: heads_per_group={hpg} would remove every query head of a KV group "
                          f"(the model has {shape.n_q} query / {shape.n_kv} KV heads: at most {shape.group - 1})")
    if kvg >= shape.n_kv:
        raise RecipeError(f"{step}: kv_groups={kvg} would remove every KV head (the model has {shape.n_kv}; "
                          f"at most {shape.n_kv - 1})")
    return hpg, kvg


def run_prune_heads(ctx: Context, params: dict[str, Any]) -> dict[str, Any]:
    """Recipe step ``prune-heads: {heads_per_group: N} | {kv_groups: N} | {fraction: F}``."""
    step = "prune-heads"
    model = ctx.loaded.model
    if _arch(model) == "bert":
        _check_params(step, params, {"heads", "fraction"})
        from miaotui.compress.prune.structured_encoder import encoder_prune_heads

        return encoder_prune_heads(ctx, params)
    _check_params(step, params, {"heads_per_group", "kv_groups", "fraction", "refit"})
    shape = head_shape(_first_attn(model))
    hpg, kvg = _heads_to_remove(step, params, shape)
    refit = _bool_param(step, params, "refit")
    before = count_params(model)
    plans = prune_heads(model, ctx.calib_ids(), hpg, kvg, progress=ctx.progress, refit=refit)
    n_q, n_kv = len(plans[0].keep_q), len(plans[0].keep_kv)
    if _arch(model) == "llama":
        _record_shape(ctx, num_attention_heads=n_q, num_key_value_heads=n_kv, head_dim=shape.head_dim)
    else:
        _record_shape(ctx, n_head=n_q, head_dim=shape.head_dim)
    return {"heads_per_group": hpg, "kv_groups": kvg, "query_heads": [shape.n_q, n_q], "kv_heads": [shape.n_kv, n_kv],
            "params_removed": before - count_params(model),
            "kept": [{"q": p.keep_q, "kv": p.keep_kv} for p in plans]}


def _first_attn(model: nn.Module) -> nn.Module:
    layer = decoder_layers(model)[0]
    return layer.self_attn if hasattr(layer, "self_attn") else layer.attn


# ---- MLP channels


class ChannelContribution:
    """Per intermediate channel j: rms(a_j) · ||W_down[:, j]||, the RMS norm of its contribution to the
    MLP output. Fed the input of the down projection, (rows, I)."""

    def __init__(self, down_weight: torch.Tensor):
        self.col_norm = down_weight.detach().float().norm(dim=0).double()
        self.sq = torch.zeros_like(self.col_norm)
        self.n = 0

    def add(self, a: torch.Tensor) -> None:
        self.sq += a.float().pow(2).sum(0, dtype=torch.float64)
        self.n += a.shape[0]

    def scores(self) -> torch.Tensor:
        return ((self.sq / max(self.n, 1)).sqrt() * self.col_norm).float()


def mlp_linears(layer: nn.Module) -> tuple[str, nn.Module]:
    """(qualified name of the down projection relative to the layer, the MLP module)."""
    return ("mlp.down_proj", layer.mlp) if hasattr(layer, "self_attn") else ("mlp.c_proj", layer.mlp)


def intermediate_size(mlp: nn.Module) -> int:
    return mlp.down_proj.in_features if hasattr(mlp, "down_proj") else mlp.c_proj.in_features


def prune_layer_channels(mlp: nn.Module, keep: torch.Tensor) -> None:
    """Keep only intermediate channels ``keep`` (sorted indices) of a llama or GPT-2 MLP."""
    keep = torch.as_tensor(keep, dtype=torch.long)
    if hasattr(mlp, "c_fc"):  # GPT-2
        _dense(mlp.c_fc, mlp.c_proj)
        mlp.c_fc, mlp.c_proj = slice_linear(mlp.c_fc, keep), slice_linear(mlp.c_proj, cols=keep)
        return
    inter = mlp.down_proj.in_features
    if mlp.gate_up_proj is not None:  # gate rows [0, I), up rows [I, 2I)
        _dense(mlp.gate_up_proj, mlp.down_proj)
        mlp.gate_up_proj = slice_linear(mlp.gate_up_proj, torch.cat([keep, keep + inter]))
    else:
        _dense(mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        mlp.gate_proj, mlp.up_proj = slice_linear(mlp.gate_proj, keep), slice_linear(mlp.up_proj, keep)
    mlp.down_proj = slice_linear(mlp.down_proj, cols=keep)


@torch.no_grad()
def prune_channels(model: nn.Module, ids: torch.Tensor, keep: int, progress: bool = True,
                   refit: bool = False) -> list[torch.Tensor]:
    """Keep the ``keep`` highest-scoring intermediate channels of every MLP (scored on calibration ids
    (N, T), layer by layer); returns each layer's kept channel indices (sorted). ``refit``: re-fit the
    down projection on the kept channels (``refit_columns``)."""
    from miaotui.compress.layerwise import HessianStat, layer_by_layer

    model.clear_cache()
    kept = []
    for calib in layer_by_layer(model, ids, progress=progress, desc="prune channels"):
        layer = calib.layer
        name, mlp = mlp_linears(layer)
        down = calib.linears[name]
        stat, gram = ChannelContribution(down.weight), HessianStat(down.in_features) if refit else None
        calib.capture({name: (stat, gram) if refit else stat})
        idx = torch.sort(torch.topk(stat.scores(), keep).indices).values
        if refit:
            refit_columns(down, gram.h, idx)
        prune_layer_channels(mlp, idx)
        kept.append(idx)
        calib.advance()
    return kept


def channels_to_keep(step: str, p: dict[str, Any], inter: int) -> int:
    """How many intermediate channels stay: ``keep`` as given, or ``fraction`` removed, rounded to the
    nearest multiple of ``multiple_of`` (default 32) so matmul widths stay kernel-friendly."""
    keep = _int_param(step, p, "keep", lo=1)
    frac = _fraction_param(step, p)
    multiple = _int_param(step, p, "multiple_of", lo=1) or 32
    if (keep is None) == (frac is None):
        raise RecipeError(f"{step}: give exactly one of keep (channels per layer) or fraction (removed)")
    if keep is None:
        keep = max(multiple, round(inter * (1 - frac) / multiple) * multiple) if inter >= multiple else \
            max(1, round(inter * (1 - frac)))
    if keep > inter:
        raise RecipeError(f"{step}: keep={keep} exceeds the model's intermediate size {inter}")
    return keep


def run_prune_channels(ctx: Context, params: dict[str, Any]) -> dict[str, Any]:
    """Recipe step ``prune-channels: {fraction: F} | {keep: N}, multiple_of: 32``."""
    step = "prune-channels"
    _check_params(step, params, {"fraction", "keep", "multiple_of", "refit"})
    model = ctx.loaded.model
    if _arch(model) == "bert":
        from miaotui.compress.prune.structured_encoder import encoder_prune_channels

        return encoder_prune_channels(ctx, params)
    inter = intermediate_size(decoder_layers(model)[0].mlp)
    keep = channels_to_keep(step, params, inter)
    refit = _bool_param(step, params, "refit")
    before = count_params(model)
    prune_channels(model, ctx.calib_ids(), keep, progress=ctx.progress, refit=refit)
    _record_shape(ctx, **({"intermediate_size": keep} if _arch(model) == "llama" else {"n_inner": keep}))
    return {"intermediate_size": [inter, keep], "params_removed": before - count_params(model)}


# ---- layers


def _cosine_per_token(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos(a_t, b_t) for every token of (..., C) hidden states, in fp64, skipping each sequence's first
    position: it acts as an attention sink with an outlier norm that says nothing about the layer."""
    a, b = a[:, 1:].double(), b[:, 1:].double()
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).reshape(-1)


@torch.no_grad()
def layer_distances(model: nn.Module, ids: torch.Tensor, block: int = 1, progress: bool = True) -> torch.Tensor:
    """(L - block + 1,): the mean angular distance arccos(cos)/π between the hidden states entering layer l
    and those leaving layer l + block - 1, over the calibration tokens. ``block=1`` is the per-layer
    distance (ShortGPT's block influence 1 - cos, ranked the same way)."""
    from miaotui.compress.layerwise import layer_by_layer

    model.clear_cache()
    states: collections.deque = collections.deque(maxlen=block + 1)  # boundary states l-block..l
    out = []
    for calib in layer_by_layer(model, ids, progress=progress, desc="layer distances"):
        if calib.index == 0:
            states.append(calib.xs)
        calib.advance()
        states.append(calib.xs)
        if len(states) == block + 1:
            cos = torch.cat([_cosine_per_token(a, b) for a, b in zip(states[0], states[-1])])
            out.append(torch.arccos(cos.clamp(-1, 1)).mean() / math.pi)
    return torch.stack(out).float()


def drop_layers(model: nn.Module, drop: list[int]) -> None:
    """Remove decoder layers ``drop`` (indices into the current stack)."""
    layers = decoder_layers(model)
    if not drop or len(set(drop)) != len(drop) or not all(0 <= i < len(layers) for i in drop):
        raise ValueError(f"drop must be distinct layer indices below {len(layers)}, got {drop}")
    if len(drop) >= len(layers):
        raise ValueError("cannot drop every layer")
    kept = nn.ModuleList(blk for i, blk in enumerate(layers) if i not in set(drop))
    if _arch(model) == "llama":
        model.model.layers = kept
    else:
        model.transformer.h = kept


def run_prune_layers(ctx: Context, params: dict[str, Any]) -> dict[str, Any]:
    """Recipe step ``prune-layers: {count: N} | {fraction: F} | {layers: [i, ...]}, method: influence|angular``."""
    step = "prune-layers"
    _check_params(step, params, {"count", "fraction", "layers", "method"})
    model = ctx.loaded.model
    arch = _arch(model)
    n_layers = len(model.layers) if arch == "bert" else len(decoder_layers(model))
    method = params.get("method", "influence")
    if method not in ("influence", "angular"):
        raise RecipeError(f"{step}: method must be 'influence' (ShortGPT) or 'angular' (Gromov et al.), got {method!r}")
    count, frac, explicit = _int_param(step, params, "count", lo=1), _fraction_param(step, params), params.get("layers")
    if sum(x is not None for x in (count, frac, explicit)) != 1:
        raise RecipeError(f"{step}: give exactly one of count, fraction or layers")
    if explicit is not None:
        if not isinstance(explicit, list) or not all(isinstance(i, int) and 0 <= i < n_layers for i in explicit):
            raise RecipeError(f"{step}: layers must be a list of layer indices below {n_layers}, got {explicit!r}")
        count = len(set(explicit))
    elif frac is not None:
        count = round(frac * n_layers)
    if not 1 <= count < n_layers:
        raise RecipeError(f"{step}: can drop 1..{n_layers - 1} of {n_layers} layers, not {count}")
    if arch == "gpt2" and model.args.scale_attn_by_inverse_layer_idx:
        raise RecipeError(f"{step}: this GPT-2 scales attention by 1/layer_index, which dropping layers would "
                          "change for the layers after the cut")
    if arch == "bert":
        from miaotui.compress.prune.structured_encoder import encoder_prune_layers

        return encoder_prune_layers(ctx, count, method, explicit)
    before = count_params(model)
    scores = None
    if explicit is not None:
        drop = sorted(set(explicit))
    else:
        ids = ctx.calib_ids()
        block = count if method == "angular" else 1
        scores = layer_distances(model, ids, block, progress=ctx.progress)
        if method == "angular":  # the contiguous block whose input and output are most alike
            start = int(torch.argmin(scores))
            drop = list(range(start, start + count))
        else:
            drop = sorted(torch.argsort(scores, stable=True)[:count].tolist())
    drop_layers(model, drop)
    _record_shape(ctx, **{"num_hidden_layers" if arch == "llama" else "n_layer": n_layers - count})
    record = {"method": method if explicit is None else "explicit", "dropped": drop,
              "num_hidden_layers": [n_layers, n_layers - count], "params_removed": before - count_params(model)}
    if scores is not None:
        record["distances"] = [round(x, 5) for x in scores.tolist()]
    return record
