"""GPT-2: learned positions, LayerNorm, fused q/k/v (``c_attn``), GELU MLP.

Hugging Face stores GPT-2's projections as ``Conv1D`` with (in, out) weights; we transpose them once at
load into ``nn.Linear`` so every projection is swappable like any other model's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from miaotui.models.base import CausalLM, KVCache, attend, position_ids
from miaotui.models.registry import register

_ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


@dataclass
class GPT2Args:
    vocab_size: int
    n_embd: int
    n_layer: int
    n_head: int
    n_positions: int = 1024
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    head_dim: int | None = None  # written by head pruning (fewer heads, same n_embd); else n_embd // n_head

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "GPT2Args":
        from miaotui.errors import ModelLoadError

        act = cfg.get("activation_function", "gelu_new")
        if act not in _ACTIVATIONS:
            raise ModelLoadError(f"gpt2: unsupported activation {act!r} (supported: {', '.join(_ACTIVATIONS)})")
        return cls(
            vocab_size=cfg["vocab_size"], n_embd=cfg["n_embd"], n_layer=cfg["n_layer"], n_head=cfg["n_head"],
            n_positions=cfg.get("n_positions", 1024), n_inner=cfg.get("n_inner"),
            layer_norm_epsilon=cfg.get("layer_norm_epsilon", 1e-5), activation_function=act,
            scale_attn_weights=cfg.get("scale_attn_weights", True),
            scale_attn_by_inverse_layer_idx=cfg.get("scale_attn_by_inverse_layer_idx", False),
            tie_word_embeddings=cfg.get("tie_word_embeddings", True), head_dim=cfg.get("head_dim"),
        )


class Attention(nn.Module):
    def __init__(self, a: GPT2Args, layer_idx: int):
        super().__init__()
        self.head_dim = a.head_dim or a.n_embd // a.n_head
        width = a.n_head * self.head_dim  # n_embd unless heads were pruned
        self.c_attn = nn.Linear(a.n_embd, 3 * width)
        self.c_proj = nn.Linear(width, a.n_embd)
        scale = 1 / math.sqrt(self.head_dim) if a.scale_attn_weights else 1.0
        self.scale = scale / (layer_idx + 1) if a.scale_attn_by_inverse_layer_idx else scale
        self.kv_cache: KVCache | None = None  # or any cache with the same ``attend``

    def forward(self, x: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.c_attn(x).chunk(3, dim=-1)
        q, k, v = (z.view(b, t, -1, self.head_dim).transpose(1, 2) for z in (q, k, v))  # (B, H, T, D)
        if self.kv_cache is not None:  # static or paged: the cache writes k/v and attends
            y = self.kv_cache.attend(q, k, v, start, scale=self.scale)
        elif isinstance(start, torch.Tensor) or start != 0:
            raise ValueError("start_pos > 0 needs a KV cache (call setup_cache first)")
        else:
            y = attend(q, k, v, 0, scale=self.scale)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, a: GPT2Args):
        super().__init__()
        inner = a.n_inner or 4 * a.n_embd
        self.c_fc = nn.Linear(a.n_embd, inner)
        self.c_proj = nn.Linear(inner, a.n_embd)
        self.act = _ACTIVATIONS[a.activation_function]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, a: GPT2Args, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(a.n_embd, eps=a.layer_norm_epsilon)
        self.attn = Attention(a, layer_idx)
        self.ln_2 = nn.LayerNorm(a.n_embd, eps=a.layer_norm_epsilon)
        self.mlp = MLP(a)

    def forward(self, x: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), start)
        return x + self.mlp(self.ln_2(x))


class Body(nn.Module):
    def __init__(self, a: GPT2Args):
        super().__init__()
        self.wte = nn.Embedding(a.vocab_size, a.n_embd)
        self.wpe = nn.Embedding(a.n_positions, a.n_embd)
        self.h = nn.ModuleList(Block(a, i) for i in range(a.n_layer))
        self.ln_f = nn.LayerNorm(a.n_embd, eps=a.layer_norm_epsilon)


@register("gpt2")
class GPT2LMHeadModel(CausalLM):
    model_type = "gpt2"
    # c_attn is fused q|k|v: column-parallel sharding must split each third, which tp.py handles by name
    tp_plan = {"c_attn": "colwise_qkv", "attn.c_proj": "rowwise", "c_fc": "colwise", "mlp.c_proj": "rowwise",
               "wte": "vocab", "lm_head": "vocab"}
    _CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

    def __init__(self, args: GPT2Args):
        super().__init__()
        self.args = args
        self.max_seq_len = args.n_positions
        self.transformer = Body(args)
        self.lm_head = nn.Linear(args.n_embd, args.vocab_size, bias=False)

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "GPT2LMHeadModel":
        return cls(GPT2Args.from_dict(cfg))

    @classmethod
    def convert_hf_state_dict(cls, sd: dict[str, torch.Tensor], cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = {}
        for name, w in sd.items():
            if name.endswith(".attn.bias") or name.endswith(".attn.masked_bias"):
                continue  # old checkpoints store the causal mask as a buffer
            if not name.startswith(("transformer.", "lm_head.")):
                name = "transformer." + name  # GPT2Model checkpoints have no prefix
            out[name] = w.t().contiguous() if name.endswith(cls._CONV1D) else w
        return out

    def tie_weights(self) -> None:
        if self.args.tie_word_embeddings:
            if type(self.lm_head) is nn.Linear:  # a quantized head (compress) carries its own tie
                self.lm_head.weight = self.transformer.wte.weight

    def attention_layers(self) -> list[Attention]:
        return [blk.attn for blk in self.transformer.h]

    def kv_shape(self) -> tuple[int, int]:
        attn = self.transformer.h[0].attn
        return attn.c_proj.in_features // attn.head_dim, attn.head_dim

    def forward(self, input_ids: torch.Tensor, start_pos: int | torch.Tensor = 0,
                last_only: bool = False, logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        pos = position_ids(start_pos, input_ids.shape[1], input_ids.device)
        x = self.transformer.wte(input_ids) + self.transformer.wpe(pos)
        for blk in self.transformer.h:
            x = blk(x, start_pos)
        x = self.logit_positions(x, last_only, logit_rows)
        return self.lm_head(self.transformer.ln_f(x))
