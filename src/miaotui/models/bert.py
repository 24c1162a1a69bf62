"""BERT-family encoders (BERT, RoBERTa, XLM-RoBERTa): absolute positions, token types, bidirectional attention,
and the heads a checkpoint carries: masked-LM, sequence classification, sentence-transformers pooling.

The fast path works on a *packed* batch: the tokens of all inputs concatenated, (N, C), no padding. Every
linear layer (~93 % of the FLOPs of MiniLM at 150 tokens) runs on real tokens only. Attention too, where the
native kernel runs (``kernels.varlen_attention``: per sequence and head, on the packed q/k/v, CPU inference):
elsewhere (training, CUDA, no compiler) it gathers the packed q/k/v into a (B, H, T, D) layout with a key
mask, because SDPA needs rectangles. The caller sorts inputs by length (``encoder/api.py``), so that small
padding is the only one left.

RoBERTa differs from BERT by a position offset (positions start at ``pad_token_id + 1``), no pooler, and a
two-layer classification head; the rest is shared.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from miaotui import kernels
from miaotui.errors import ModelLoadError
from miaotui.models.base import fuse_linears

ACTIVATIONS = {
    "gelu": F.gelu,  # BERT's "gelu" is the exact erf form
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


@dataclass
class BertArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    position_offset: int = 0  # RoBERTa: positions start at pad_token_id + 1
    tie_word_embeddings: bool = True
    id2label: dict[int, str] = field(default_factory=dict)
    problem_type: str | None = None

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "BertArgs":
        model_type = cfg.get("model_type", "bert")
        act = cfg.get("hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise ModelLoadError(f"hidden_act {act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ModelLoadError(f"position_embedding_type {cfg['position_embedding_type']!r}: only absolute")
        pad = cfg.get("pad_token_id") or 0
        labels = cfg.get("id2label") or {}
        return cls(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            max_position_embeddings=cfg.get("max_position_embeddings", 512),
            type_vocab_size=cfg.get("type_vocab_size", 2), layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
            hidden_act=act, pad_token_id=pad,
            position_offset=pad + 1 if model_type in ROBERTA_TYPES else 0,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            id2label={int(k): v for k, v in labels.items()}, problem_type=cfg.get("problem_type"),
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_tokens(self) -> int:
        """The longest input the position table allows."""
        return self.max_position_embeddings - self.position_offset


ROBERTA_TYPES = ("roberta", "xlm-roberta")


@dataclass
class Packed:
    """A batch of B sequences, concatenated: N tokens in all. Build with ``pack``."""

    input_ids: torch.Tensor  # (N,)
    position_ids: torch.Tensor  # (N,)
    token_type_ids: torch.Tensor  # (N,)
    lengths: list[int]  # B lengths, summing to N
    starts: torch.Tensor  # (B,) index of each sequence's first token
    seq_index: torch.Tensor  # (N,) which sequence each token belongs to
    pad_index: torch.Tensor | None  # (B, T) packed row of each padded slot (padding repeats a real row)
    valid_flat: torch.Tensor | None  # (N,) where each token sits in the flattened (B*T) padded layout
    key_mask: torch.Tensor | None  # (B, 1, 1, T) True = attend; None when every length is equal
    cu_seqlens: torch.Tensor  # (B + 1,) int64: sequence b is rows cu_seqlens[b]:cu_seqlens[b + 1]

    @property
    def layout(self) -> tuple[torch.Tensor | None, ...]:
        """What attention needs, as tensors only: a compiled layer stack then never specialises on the
        python-int ``lengths`` (which would recompile for every new batch)."""
        return self.pad_index, self.valid_flat, self.key_mask, self.cu_seqlens


def pack(seqs: list[list[int]], token_types: list[list[int]] | None = None, position_offset: int = 0,
         positions: list[list[int]] | None = None, device: torch.device | str = "cpu") -> Packed:
    """Concatenate token id lists; ``positions`` overrides the default ``offset + arange(len)`` per input."""
    lengths = [len(s) for s in seqs]
    if not seqs or min(lengths) == 0:
        raise ValueError("pack needs at least one non-empty sequence")
    n, b, t = sum(lengths), len(seqs), max(lengths)
    ids = torch.tensor([i for s in seqs for i in s], dtype=torch.long, device=device)
    if positions is None:
        positions = [range(position_offset, position_offset + n_) for n_ in lengths]
    pos = torch.tensor([p for ps in positions for p in ps], dtype=torch.long, device=device)
    tt = (torch.tensor([x for s in token_types for x in s], dtype=torch.long, device=device)
          if token_types is not None else torch.zeros(n, dtype=torch.long, device=device))
    lens = torch.tensor(lengths, device=device)
    starts = torch.cumsum(lens, 0) - lens
    seq_index = torch.repeat_interleave(torch.arange(b, device=device), lens)
    pad_index = valid_flat = key_mask = None
    if b > 1:
        slot = torch.arange(t, device=device)
        valid = slot[None, :] < lens[:, None]  # (B, T)
        # padding slots copy the sequence's first row: they are masked as keys and dropped as queries
        pad_index = torch.where(valid, starts[:, None] + slot[None, :], starts[:, None])
        valid_flat = torch.nonzero(valid.flatten()).squeeze(1)  # row-major = packed order
        if min(lengths) != t:
            key_mask = valid[:, None, None, :]
    cu_seqlens = torch.cat([starts, lens.sum().reshape(1)]).to(torch.long)
    return Packed(ids, pos, tt, lengths, starts, seq_index, pad_index, valid_flat, key_mask, cu_seqlens)


class SelfAttention(nn.Module):
    def __init__(self, a: BertArgs):
        super().__init__()
        c = a.hidden_size
        self.head_dim = a.head_dim
        self.query, self.key, self.value = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.out = nn.Linear(c, c)
        self.qkv: nn.Linear | None = None  # set by fuse(): one matmul instead of three
        self.qkv_split: list[int] = []
        self.native = False  # set by encoder/prepare.py where the native varlen kernel runs (CPU)

    def fuse(self) -> None:
        self.qkv, self.qkv_split = fuse_linears([self.query, self.key, self.value])
        del self.query, self.key, self.value

    def forward(self, x: torch.Tensor, layout: tuple) -> torch.Tensor:
        """x: (N, C) packed → (N, C); ``layout`` is ``Packed.layout``."""
        pad_index, valid_flat, key_mask, cu_seqlens = layout
        if self.qkv is not None:
            qkv = self.qkv(x)  # (N, 3W)
        else:
            qkv = torch.cat([self.query(x), self.key(x), self.value(x)], dim=-1)
        width = qkv.shape[-1] // 3  # heads come from the weights, so a head-pruned layer works unchanged
        if width == 0:  # every head pruned: only the output bias is left
            return self.out(qkv)
        heads = width // self.head_dim
        if self.native and not qkv.requires_grad:  # no autograd through the native op
            # an fp32 kernel: bf16 activations are widened for it (still faster than SDPA's bf16 kernel)
            y = kernels.varlen_attention(qkv.float(), cu_seqlens, heads, self.head_dim ** -0.5)
            return self.out(y.to(qkv.dtype))
        if pad_index is None:  # one sequence: no padding at all
            q, k, v = qkv.view(1, -1, 3, heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 × (1, H, N, D)
            return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(-1, width))
        b, t = pad_index.shape
        # index_select into (B, T, ...) measured 1.3x faster than indexing with a padded zero row
        q, k, v = qkv.index_select(0, pad_index.flatten()).view(b, t, 3, heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(b * t, width).index_select(0, valid_flat)  # back to packed (N, W)
        return self.out(y)


class Layer(nn.Module):
    def __init__(self, a: BertArgs):
        super().__init__()
        self.attention = SelfAttention(a)
        self.attention_norm = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)
        self.intermediate = nn.Linear(a.hidden_size, a.intermediate_size)
        self.output = nn.Linear(a.intermediate_size, a.hidden_size)
        self.output_norm = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)
        self.act_name = a.hidden_act
        self.act = ACTIVATIONS[a.hidden_act]

    def forward(self, x: torch.Tensor, layout: tuple) -> torch.Tensor:
        # post-norm, as in the original BERT
        x = self.attention_norm(x + self.attention(x, layout))
        fused = getattr(self.intermediate, "forward_activated", None)  # a prepared linear: maybe in the epilogue
        h = fused(x, self.act_name, self.act) if fused is not None else self.act(self.intermediate(x))
        return self.output_norm(x + self.output(h))


class Embeddings(nn.Module):
    def __init__(self, a: BertArgs):
        super().__init__()
        self.word_embeddings = nn.Embedding(a.vocab_size, a.hidden_size)
        self.position_embeddings = nn.Embedding(a.max_position_embeddings, a.hidden_size)
        self.token_type_embeddings = nn.Embedding(a.type_vocab_size, a.hidden_size)
        self.norm = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)

    def forward(self, batch: Packed) -> torch.Tensor:
        x = self.word_embeddings(batch.input_ids) + self.token_type_embeddings(batch.token_type_ids)
        return self.norm(x + self.position_embeddings(batch.position_ids))


class MaskedLMHead(nn.Module):
    """dense → activation → LayerNorm → vocabulary projection (tied to the word embeddings) + bias."""

    def __init__(self, a: BertArgs):
        super().__init__()
        self.dense = nn.Linear(a.hidden_size, a.hidden_size)
        self.norm = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)
        self.decoder = nn.Linear(a.hidden_size, a.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(a.vocab_size))
        self.act = ACTIVATIONS[a.hidden_act]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(h)))) + self.bias


class ClassificationHead(nn.Module):
    """BERT: the pooler's tanh(dense(CLS)) → out. RoBERTa: tanh(dense(<s>)) → out, with its own dense."""

    def __init__(self, a: BertArgs, own_dense: bool):
        super().__init__()
        self.dense = nn.Linear(a.hidden_size, a.hidden_size) if own_dense else None
        self.out = nn.Linear(a.hidden_size, max(len(a.id2label), 1))

    def forward(self, first: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.dense(first)) if self.dense is not None else first)


POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len", "lasttoken")  # sentence-transformers' concat order


def pool(hidden: torch.Tensor, batch: Packed, modes: tuple[str, ...] = ("mean",)) -> torch.Tensor:
    """Sentence-transformers' pooling over a packed batch: (N, C) → (B, C * len(modes)), in fp32."""
    h = hidden.float()
    b, c = len(batch.lengths), h.shape[1]
    lens = torch.tensor(batch.lengths, device=h.device, dtype=h.dtype)[:, None]
    out = []
    for mode in POOLING_MODES:
        if mode not in modes:
            continue
        if mode == "cls":
            out.append(h[batch.starts])
        elif mode == "lasttoken":
            out.append(h[batch.starts + lens.squeeze(1).long() - 1])
        elif mode == "max":
            init = torch.full((b, c), float("-inf"), device=h.device)
            out.append(init.scatter_reduce(0, batch.seq_index[:, None].expand(-1, c), h, "amax"))
        else:
            total = torch.zeros(b, c, device=h.device).index_add_(0, batch.seq_index, h)
            out.append(total / lens if mode == "mean" else total / lens.sqrt())
    return torch.cat(out, dim=-1)


class BertEncoder(nn.Module):
    """The encoder body plus whichever heads its weights have (``heads`` ⊆ {"pooler", "mlm", "classifier"})."""

    def __init__(self, args: BertArgs, model_type: str = "bert", heads: frozenset[str] = frozenset()):
        super().__init__()
        self.args, self.model_type, self.heads = args, model_type, frozenset(heads)
        self.embeddings = Embeddings(args)
        self.layers = nn.ModuleList(Layer(args) for _ in range(args.num_hidden_layers))
        roberta = model_type in ROBERTA_TYPES
        self.pooler = nn.Linear(args.hidden_size, args.hidden_size) if "pooler" in heads else None
        self.mlm = MaskedLMHead(args) if "mlm" in heads else None
        # a BERT classifier reads the pooler's output; RoBERTa's has its own dense layer
        self.classifier = ClassificationHead(args, own_dense=roberta) if "classifier" in heads else None
        self._body = self._run_layers  # replaced by a compiled version in compile()

    @classmethod
    def from_config(cls, cfg: dict[str, Any], heads: frozenset[str] = frozenset()) -> "BertEncoder":
        return cls(BertArgs.from_dict(cfg), cfg.get("model_type", "bert"), heads)

    # -- weights -------------------------------------------------------------------------------------------
    @staticmethod
    def convert_hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map Hugging Face names (BertModel, BertFor*, RobertaModel, RobertaFor*) onto ours."""
        out = {}
        for name, t in sd.items():
            name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
            name = re.sub(r"^(bert|roberta)\.", "", name)
            if name in DROPPED or name.endswith("position_ids"):
                continue
            for pattern, repl in NAME_MAP:
                name, hits = pattern.subn(repl, name)
                if hits:
                    break
            out[name] = t
        return out

    @staticmethod
    def heads_in(sd: dict[str, torch.Tensor]) -> frozenset[str]:
        """Which heads a converted state dict carries."""
        found = {"pooler": "pooler.weight", "mlm": "mlm.dense.weight", "classifier": "classifier.out.weight"}
        return frozenset(h for h, key in found.items() if key in sd)

    def tie_weights(self) -> None:
        if self.mlm is not None and self.args.tie_word_embeddings:
            self.mlm.decoder.weight = self.embeddings.word_embeddings.weight

    def fuse(self) -> None:
        for layer in self.layers:
            attn = layer.attention
            if attn.qkv is None and all(type(m) is nn.Linear for m in (attn.query, attn.key, attn.value)):
                attn.fuse()

    def compile(self) -> None:
        """Compile the layer stack (dynamic shapes: one graph for every batch and length)."""
        self._body = torch.compile(self._run_layers, dynamic=True)

    # -- forward -------------------------------------------------------------------------------------------
    def _run_layers(self, x: torch.Tensor, layout: tuple) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, layout)
        return x

    def forward(self, batch: Packed) -> torch.Tensor:
        """Last hidden states of the packed batch, (N, C)."""
        return self._body(self.embeddings(batch), batch.layout)

    def pack(self, seqs: list[list[int]], token_types: list[list[int]] | None = None) -> Packed:
        return pack(seqs, token_types, self.args.position_offset, device=self.embeddings.norm.weight.device)

    def pooled_first(self, hidden: torch.Tensor, batch: Packed) -> torch.Tensor:
        """BERT's pooler: tanh(dense(first token)), (B, C)."""
        if self.pooler is None:
            raise ValueError("this model has no pooler weights")
        return torch.tanh(self.pooler(hidden[batch.starts]))

    def classify(self, hidden: torch.Tensor, batch: Packed) -> torch.Tensor:
        """Sequence-classification logits (B, num_labels)."""
        first = hidden[batch.starts]
        if self.classifier.dense is None:  # BERT: the classifier reads the pooler's output
            first = self.pooled_first(hidden, batch)
        return self.classifier(first)

    def forward_padded(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, Packed]:
        """Padded (B, T) inputs, positions as transformers counts them → packed hidden states (N, C)."""
        mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        if self.args.position_offset:  # RoBERTa numbers the non-padding tokens after pad_token_id
            keep = input_ids != self.args.pad_token_id
            pos = torch.cumsum(keep, 1) * keep + self.args.pad_token_id
        else:  # BERT: the slot index, whatever the mask
            pos = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        tt = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
        rows = [m.nonzero().squeeze(1) for m in mask]
        batch = pack([input_ids[i, r].tolist() for i, r in enumerate(rows)],
                     [tt[i, r].tolist() for i, r in enumerate(rows)],
                     positions=[pos[i, r].tolist() for i, r in enumerate(rows)],
                     device=self.embeddings.norm.weight.device)
        return self(batch), batch


# HF → ours, after the "bert."/"roberta." prefix is stripped; the first matching pattern wins
NAME_MAP = [(re.compile(p), r) for p, r in [
    (r"^encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.", r"layers.\1.attention.\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.attention.out."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"layers.\1.attention_norm."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.intermediate."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.output."),
    (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"layers.\1.output_norm."),
    (r"^embeddings\.LayerNorm\.", "embeddings.norm."),
    (r"^pooler\.dense\.", "pooler."),
    (r"^(cls\.predictions\.transform|lm_head)\.dense\.", "mlm.dense."),
    (r"^(cls\.predictions\.transform\.LayerNorm|lm_head\.layer_norm)\.", "mlm.norm."),
    (r"^(cls\.predictions|lm_head)\.decoder\.weight$", "mlm.decoder.weight"),
    (r"^(cls\.predictions|lm_head)\.bias$", "mlm.bias"),
    (r"^classifier\.(weight|bias)$", r"classifier.out.\1"),  # BERT: one linear after the pooler
    (r"^classifier\.out_proj\.", "classifier.out."),  # RoBERTa: dense → tanh → out_proj
]]
# copies of other weights: the decoder bias is the head's ``bias``
DROPPED = {"cls.predictions.decoder.bias", "lm_head.decoder.bias"}

ENCODER_TYPES = {"bert": BertEncoder, "roberta": BertEncoder, "xlm-roberta": BertEncoder}
