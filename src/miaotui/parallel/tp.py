"""Apply the tensor-parallel plan a model file declares (``CausalLM.tp_plan``) to a built model, in place.

Megatron-style: in every block the first projections are column-parallel (each rank keeps a slice of the
output features: some heads of q/k/v, some rows of gate/up) and the last is row-parallel (the matching
slice of input features); the partial sums of the row-parallel layer are all-reduced by its wrapper,
``RowParallelLinear``, so the model code calls no collective. One all-reduce per attention and one per MLP.

Plan kinds: ``colwise`` (split output features), ``colwise_qkv`` (a fused [q; k; v] projection: each third
is split on its own), ``rowwise`` (split input features, all-reduce), ``vocab`` (embedding / lm_head split
by vocabulary rows; optional). Fused projections made by ``CausalLM.fuse()`` (``qkv_proj``, ``gate_up_proj``)
are understood too, so TP may run before or after fusing; before is simpler (fusing the shards then gives
[q-shard; k-shard; v-shard] by construction).

Heads are split GQA-aware: rank r keeps query heads [r*H/W, (r+1)*H/W) and exactly the KV heads those query
heads read. With fewer KV heads than ranks (W a multiple of Hkv) each KV head is replicated on W/Hkv ranks.
Head counts that do not divide raise ``TPError`` before any weight is touched.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from miaotui.errors import MiaotuiError

# names ``CausalLM.fuse()`` gives fused projections → the plan kind they take
FUSED_KINDS = {"qkv_proj": "colwise_qkv", "gate_up_proj": "colwise_pair"}
UNEVEN_ENV = "MIAOTUI_TP_UNEVEN_HEADS"  # read by parallel/launch.py: the CLI's way to opt in


class TPError(MiaotuiError):
    """The model cannot be split over this many ranks (heads or widths do not divide)."""


# ---------------------------------------------------------------- collectives used by the wrappers

def all_reduce_sum(y: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``y`` over the ranks. Half-precision partial sums are reduced in fp32: gloo's bf16 support is
    patchy, and summing in fp32 keeps TP's result closer to the unsplit matmul."""
    if y.dtype in (torch.bfloat16, torch.float16):
        z = y.float()
        dist.all_reduce(z, group=group)
        return z.to(y.dtype)
    dist.all_reduce(y, group=group)
    return y


class RowParallelLinear(nn.Module):
    """A row-parallel projection: ``inner`` holds this rank's input-feature slice (any linear module:
    dense, quantized...); its partial output is all-reduced, then the (unsplit) bias is added once."""

    def __init__(self, inner: nn.Module, bias: torch.Tensor | None, group=None):
        super().__init__()
        self.inner, self.group = inner, group
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @property
    def in_features(self) -> int:  # local (per-rank) width, what the model's reshapes see
        return self.inner.in_features

    @property
    def out_features(self) -> int:
        return self.inner.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = all_reduce_sum(self.inner(x), self.group)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + n) of the vocabulary, looked up by ``inner`` (an ``nn.Embedding`` over the shard,
    or a quantized one); other ids give zeros here and their vectors come from the rank that holds them,
    through one all-reduce. ``inner`` may carry zero padding rows past ``n``."""

    def __init__(self, inner: nn.Module, start: int, n: int, vocab_size: int, group=None):
        super().__init__()
        self.inner, self.start, self.n, self.group = inner, start, n, group
        self.num_embeddings = vocab_size

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.n)
        out = self.inner(local.masked_fill(outside, 0))
        return all_reduce_sum(out.masked_fill(outside.unsqueeze(-1), 0), self.group)


class VocabParallelHead(nn.Module):
    """The output projection split by vocabulary rows: every rank computes its slice of the logits and an
    all-gather gives every rank the full (B, T, V) logits, so the model's contract is unchanged.
    All slices have the same padded width (gloo's all_gather wants equal sizes); padding is cut off."""

    def __init__(self, inner: nn.Linear, vocab_size: int, world: int, group=None):
        super().__init__()
        self.inner, self.vocab_size, self.world, self.group = inner, vocab_size, world, group

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    @property
    def in_features(self) -> int:
        return self.inner.in_features

    @property
    def out_features(self) -> int:
        return self.vocab_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.inner(x).contiguous()  # (B, T, V/W)
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts, dim=-1)[..., :self.vocab_size]


# ---------------------------------------------------------------- which rows / columns a rank keeps

def even_slice(n: int, rank: int, world: int, what: str) -> slice:
    if n % world:
        raise TPError(f"tensor parallel over {world} ranks: {what} ({n}) does not divide by {world}")
    per = n // world
    return slice(rank * per, (rank + 1) * per)


def local_heads(n_heads: int, n_kv: int, rank: int, world: int, uneven: bool = False) -> tuple[slice, slice]:
    """(query heads, KV heads) rank ``rank`` keeps, as head-index slices.

    ``uneven``: when the heads do not divide, deal out whole KV groups (a KV head and the query heads that
    read it) as evenly as they go, e.g. SmolLM2-135M's 3 groups of 3 query heads over 2 ranks as 2 + 1.
    Attention then costs the ranks unequally (the MLP still splits evenly), so it is opt-in."""
    ok_kv = n_kv % world == 0 if n_kv >= world else world % n_kv == 0
    if n_heads % world == 0 and ok_kv:
        q = even_slice(n_heads, rank, world, "query heads")
        if n_kv >= world:
            return q, even_slice(n_kv, rank, world, "KV heads")
        kv = rank // (world // n_kv)  # fewer KV heads than ranks: this rank's query heads all read this one
        return q, slice(kv, kv + 1)
    if uneven and n_kv >= world:
        group = n_heads // n_kv
        base, extra = divmod(n_kv, world)
        start = rank * base + min(rank, extra)
        stop = start + base + (rank < extra)
        return slice(start * group, stop * group), slice(start, stop)
    choices = [w for w in range(1, n_heads + 1)
               if n_heads % w == 0 and (n_kv % w == 0 if n_kv >= w else w % n_kv == 0)]
    hint = (f"; or set {UNEVEN_ENV}=1 to deal whole KV groups unevenly over the ranks" if n_kv >= world else "")
    raise TPError(
        f"tensor parallel over {world} ranks needs the attention heads to divide evenly, but this model has "
        f"{n_heads} query heads and {n_kv} KV heads; a TP size that works: {', '.join(map(str, choices))}{hint}")


def head_counts(attn: nn.Module, plan_kinds: dict[str, str]) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) of an attention module, from its attributes or its fused q|k|v."""
    d = attn.head_dim
    if hasattr(attn, "n_heads") and hasattr(attn, "n_kv"):
        return attn.n_heads, attn.n_kv, d
    for child, kind in plan_kinds.items():
        if kind == "colwise_qkv":  # GPT-2's c_attn: [q; k; v] of equal widths, so Hkv = H
            h = getattr(attn, child).out_features // (3 * d)
            return h, h, d
    raise TPError(f"{type(attn).__name__}: cannot tell its head counts (no n_heads/n_kv, no fused q|k|v)")


def _head_rows(heads: slice, d: int, offset: int = 0) -> slice:
    return slice(offset + heads.start * d, offset + heads.stop * d)


# ---------------------------------------------------------------- slicing modules

def take(module: nn.Module, rows: list[slice] | None = None, cols: slice | None = None,
         bias: bool = True) -> nn.Module:
    """A copy of a linear module keeping output ``rows`` (concatenated) and/or input ``cols``; the bias is
    sliced with the rows, or dropped when ``bias`` is False. The copies are contiguous clones, so the full
    weight is freed once the caller drops the original: each rank keeps only its shard."""
    if isinstance(module, nn.Linear):
        w = module.weight.detach()
        b = module.bias.detach() if module.bias is not None and bias else None
        if rows is not None:
            w = torch.cat([w[r] for r in rows])
            b = torch.cat([b[r] for r in rows]) if b is not None else None
        if cols is not None:
            w = w[:, cols]
        out = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
        out.__class__ = type(module)  # keep a subclass's forward (e.g. prepare.UpcastLinear)
        out.weight = nn.Parameter(w.contiguous().clone(), requires_grad=False)
        if b is not None:
            out.bias = nn.Parameter(b.contiguous().clone(), requires_grad=False)
        return out
    from miaotui.parallel.qshard import take_quantized  # quantized linears: shard codes, scale, zero

    return take_quantized(module, rows, cols, bias)


def _bias_of(module: nn.Module) -> torch.Tensor | None:
    b = getattr(module, "bias", None)
    return b.detach().clone() if isinstance(b, torch.Tensor) else None


# ---------------------------------------------------------------- the plan

def plan_kind(name: str, plan: dict[str, str]) -> str | None:
    """The kind for a module's dotted name: the longest plan key that is a suffix of it (so the key
    ``attn.c_proj`` is not confused with ``mlp.c_proj``)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in FUSED_KINDS:
        return FUSED_KINDS[leaf]
    for key in sorted(plan, key=len, reverse=True):
        if name == key or name.endswith("." + key):
            return plan[key]
    return None


def apply_tp(model: nn.Module, rank: int, world: int, group=None, vocab_parallel: bool = True,
             uneven_heads: bool = False) -> nn.Module:
    """Shard ``model`` in place for rank ``rank`` of ``world``; returns it. Needs no process group itself
    (the wrappers use ``group``, the default one when None, at forward time). ``uneven_heads``: see
    ``local_heads``."""
    if world == 1:
        return model
    plan = getattr(model, "tp_plan", None)
    if not plan:
        raise TPError(f"{type(model).__name__} declares no tensor-parallel plan (tp_plan)")
    attn_ids = {id(a) for a in model.attention_layers()}
    targets = []  # (parent, child attribute, dotted name, kind)
    for name, parent in model.named_modules():
        for child, _ in parent.named_children():
            full = f"{name}.{child}" if name else child
            kind = plan_kind(full, plan)
            if kind is not None:
                targets.append((parent, child, full, kind))
    # refuse before touching a weight: a failed split must leave the model usable
    heads = {}
    for parent, _, _, _ in targets:
        if id(parent) in attn_ids and id(parent) not in heads:
            kinds = {c: k for p, c, _, k in targets if p is parent}
            h, hkv, d = head_counts(parent, kinds)
            heads[id(parent)] = (h, hkv, d, *local_heads(h, hkv, rank, world, uneven_heads))
    shared: dict[int, nn.Parameter] = {}  # full weight id → its shard (a tied embedding and lm_head)
    for parent, child, full, kind in targets:
        module = getattr(parent, child)
        new = _shard(module, kind, full, heads.get(id(parent)), rank, world, group, vocab_parallel, shared)
        if new is not None:
            setattr(parent, child, new)
    for attn in model.attention_layers():  # head counts per rank, for code that reads them
        if id(attn) not in heads:
            continue
        h, hkv, d, q, kv = heads[id(attn)]
        if hasattr(attn, "n_heads"):
            attn.n_heads, attn.n_kv = q.stop - q.start, kv.stop - kv.start
        if getattr(attn, "qkv_split", None):
            attn.qkv_split = [(q.stop - q.start) * d, (kv.stop - kv.start) * d, (kv.stop - kv.start) * d]
    model.tp_rank, model.tp_world = rank, world
    return model


def _shard(module, kind, name, heads, rank, world, group, vocab_parallel, shared) -> nn.Module | None:
    if kind == "vocab":
        return _shard_vocab(module, rank, world, group, shared) if vocab_parallel else None
    if kind == "rowwise":  # an attention output takes the columns of this rank's query heads
        cols = (_head_rows(heads[3], heads[2]) if heads is not None
                else even_slice(module.in_features, rank, world, f"{name} input features"))
        return RowParallelLinear(take(module, cols=cols, bias=False), _bias_of(module), group)
    out = module.out_features
    if heads is not None:  # a projection inside an attention module: split by heads
        h, hkv, d, q, kv = heads
        if kind == "colwise_qkv":
            rows = [_head_rows(q, d), _head_rows(kv, d, h * d), _head_rows(kv, d, (h + hkv) * d)]
        elif out == h * d:
            rows = [_head_rows(q, d)]
        elif out == hkv * d:
            rows = [_head_rows(kv, d)]
        else:
            raise TPError(f"{name}: {out} output features are neither the query nor the KV heads' width")
        return take(module, rows=rows)
    if kind == "colwise_pair":  # fused [gate; up]: split each half
        half = out // 2
        s = even_slice(half, rank, world, f"{name} half width")
        return take(module, rows=[s, slice(half + s.start, half + s.stop)])
    if kind == "colwise":
        return take(module, rows=[even_slice(out, rank, world, f"{name} output features")])
    raise TPError(f"{name}: unknown tensor-parallel kind {kind!r}")


def _shard_vocab(module, rank, world, group, shared) -> nn.Module:
    """Rows [r*P, (r+1)*P) with P = ceil(V / W); the last shard is zero-padded to P rows so every rank's
    logit slice has the same width. A tied embedding and lm_head share one shard (``shared`` maps the full
    weight, or the full quantized head, to it)."""
    head_of = getattr(module, "head", None)  # compress's Int8Embedding reads its rows from the int8 head
    if isinstance(module, nn.Embedding):
        vocab = module.num_embeddings
    elif isinstance(module, nn.Linear) or hasattr(type(module), "from_quantized"):
        if getattr(module, "bias", None) is not None:
            raise TPError("a vocab-parallel lm_head with a bias is not supported")
        vocab = module.out_features
    elif isinstance(head_of, list) and head_of:
        vocab = head_of[0].out_features
    else:
        raise TPError(f"vocab-parallel needs an embedding or a linear head, got {type(module).__name__}")
    per = -(-vocab // world)
    start, stop = rank * per, min((rank + 1) * per, vocab)

    def head_shard(head: nn.Module) -> nn.Module:
        """The head's rows for this rank, padded; built once per full head or full weight."""
        key = id(head.weight) if isinstance(head, (nn.Linear, nn.Embedding)) else id(head)
        if key not in shared:
            if isinstance(head, (nn.Linear, nn.Embedding)):
                full = head.weight
                w = torch.zeros(per, full.shape[1], dtype=full.dtype, device=full.device)
                w[:stop - start] = full.detach()[start:stop]
                shared[key] = nn.Parameter(w, requires_grad=False)
            else:
                from miaotui.parallel.qshard import take_quantized

                shared[key] = take_quantized(head, [slice(start, stop)], None, False, pad_rows_to=per)
        return shared[key]

    if isinstance(module, nn.Embedding):
        inner = nn.Embedding(per, module.embedding_dim, device="meta")
        inner.weight = head_shard(module)
        return VocabParallelEmbedding(inner, start, stop - start, vocab, group)
    if head_of is not None:
        inner = type(module)(head_shard(head_of[0]), module.dtype)
        return VocabParallelEmbedding(inner, start, stop - start, vocab, group)
    if isinstance(module, nn.Linear):
        inner = nn.Linear(module.in_features, per, bias=False, device="meta")
        inner.__class__ = type(module)
        inner.weight = head_shard(module)
    else:
        inner = head_shard(module)
    return VocabParallelHead(inner, vocab, world, group)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of this rank's weights: the persistent state, each storage once (tied weights share one).
    KV caches and RoPE tables are non-persistent buffers, so they are not counted."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.data_ptr(), t.nbytes)
        if key not in seen:
            seen.add(key)
            total += t.nbytes
    return total
