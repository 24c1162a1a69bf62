"""The Llama family: Llama 2/3 (incl. rope scaling), SmolLM2, Mistral (sliding window), Qwen2 (q/k/v bias).

Module names mirror Hugging Face's ``LlamaForCausalLM`` so the weight name map is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from miaotui import kernels
from miaotui.models.base import (
    CausalLM, KVCache, RMSNorm, apply_rope, attend, fuse_linears, position_ids, rope_parameters, rope_tables,
)
from miaotui.models.registry import register


@dataclass
class LlamaArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope: dict[str, Any] = field(default_factory=lambda: {"rope_theta": 10000.0, "rope_type": "default"})
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "LlamaArgs":
        heads = cfg["num_attention_heads"]
        model_type = cfg.get("model_type", "llama")
        attn_bias = bool(cfg.get("attention_bias", False))
        window = cfg.get("sliding_window") if model_type == "mistral" else None
        if model_type == "qwen2" and cfg.get("use_sliding_window"):
            window = cfg.get("sliding_window")
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope=rope_parameters(cfg),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=True if model_type == "qwen2" else attn_bias,  # Qwen2 always has q/k/v bias
            o_bias=False if model_type == "qwen2" else attn_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=window,
        )

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Attention(nn.Module):
    native_ops = False  # prepare_for_inference: fp32 inference takes the one-pass rotary kernel (kernels.rope)

    def __init__(self, a: LlamaArgs):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = a.num_attention_heads, a.num_key_value_heads, a.head_dim
        self.window = a.sliding_window
        self.q_proj = nn.Linear(a.hidden_size, self.n_heads * self.head_dim, bias=a.qkv_bias)
        self.k_proj = nn.Linear(a.hidden_size, self.n_kv * self.head_dim, bias=a.qkv_bias)
        self.v_proj = nn.Linear(a.hidden_size, self.n_kv * self.head_dim, bias=a.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, a.hidden_size, bias=a.o_bias)
        self.kv_cache: KVCache | None = None  # or any cache with the same ``attend``
        self.qkv_proj: nn.Linear | None = None  # set by fuse(): one matmul instead of three
        self.qkv_split: list[int] = []

    def fuse(self) -> None:
        """Concatenate q/k/v into one projection (same math, fewer and larger matmuls)."""
        self.qkv_proj, self.qkv_split = fuse_linears([self.q_proj, self.k_proj, self.v_proj])
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                start: int | torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(self.qkv_split, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        # (B, T, H*D) → (B, H, T, D); head counts come from the weights so a TP shard works unchanged
        q = q.view(b, t, -1, self.head_dim).transpose(1, 2)
        k = k.view(b, t, -1, self.head_dim).transpose(1, 2)
        v = v.view(b, t, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin, self.native_ops), apply_rope(k, cos, sin, self.native_ops)
        if self.kv_cache is not None:  # static or paged: the cache writes k/v and attends
            y = self.kv_cache.attend(q, k, v, start, self.window)
        elif isinstance(start, torch.Tensor) or start != 0:
            raise ValueError("start_pos > 0 needs a KV cache (call setup_cache first)")
        else:
            y = attend(q, k, v, 0, self.window)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    native_ops = False  # prepare_for_inference: fp32 inference takes the one-pass silu(gate)*up (kernels.silu_mul)

    def __init__(self, a: LlamaArgs):
        super().__init__()
        self.gate_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
        self.up_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=a.mlp_bias)
        self.gate_up_proj: nn.Linear | None = None  # set by fuse()

    def fuse(self) -> None:
        self.gate_up_proj, _ = fuse_linears([self.gate_proj, self.up_proj])
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate_up = self.gate_up_proj(x)
            if self.native_ops and gate_up.dtype == torch.float32 and not gate_up.requires_grad:
                return self.down_proj(kernels.silu_mul(gate_up))
            gate, up = gate_up.chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, a: LlamaArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.self_attn = Attention(a)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.mlp = MLP(a)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                start: int | torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    def __init__(self, a: LlamaArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(Block(a) for _ in range(a.num_hidden_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)


@register("llama", "mistral", "qwen2")
class LlamaForCausalLM(CausalLM):
    tp_plan = {
        "q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise", "o_proj": "rowwise",
        "gate_proj": "colwise", "up_proj": "colwise", "down_proj": "rowwise",
        "embed_tokens": "vocab", "lm_head": "vocab",
    }

    def __init__(self, args: LlamaArgs, model_type: str = "llama"):
        super().__init__()
        self.args, self.model_type = args, model_type
        self.max_seq_len = args.max_position_embeddings
        self.model = Body(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.init_buffers()

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "LlamaForCausalLM":
        return cls(LlamaArgs.from_dict(cfg), cfg.get("model_type", "llama"))

    def init_buffers(self) -> None:
        a = self.args
        cos, sin = rope_tables(a.head_dim, a.rope, a.max_position_embeddings)
        device = self.model.norm.weight.device  # meta while the skeleton is built, real after loading
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def tie_weights(self) -> None:
        # a quantized head (compress) carries its own tie to the embedding
        if self.args.tie_word_embeddings and type(self.lm_head) is nn.Linear:
            self.lm_head.weight = self.model.embed_tokens.weight

    def fuse(self) -> None:
        for blk in self.model.layers:  # idempotent: a fused (or loaded-fused) block is left as it is
            attn, mlp = blk.self_attn, blk.mlp
            if attn.qkv_proj is None and all(type(m) is nn.Linear for m in (attn.q_proj, attn.k_proj, attn.v_proj)):
                attn.fuse()
            if mlp.gate_up_proj is None and type(mlp.gate_proj) is nn.Linear and type(mlp.up_proj) is nn.Linear:
                mlp.fuse()

    def attention_layers(self) -> list[Attention]:
        return [blk.self_attn for blk in self.model.layers]

    def kv_shape(self) -> tuple[int, int]:
        attn = self.model.layers[0].self_attn
        kv_width = attn.qkv_split[1] if attn.qkv_proj is not None else attn.k_proj.out_features
        return kv_width // attn.head_dim, attn.head_dim

    def forward(self, input_ids: torch.Tensor, start_pos: int | torch.Tensor = 0,
                last_only: bool = False, logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        t = input_ids.shape[1]
        if isinstance(start_pos, torch.Tensor):  # compiled decode or a flat batch: positions are data
            pos = position_ids(start_pos, t, input_ids.device)
            cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        else:
            cos, sin = self.rope_cos[start_pos:start_pos + t], self.rope_sin[start_pos:start_pos + t]
        x = self.model.embed_tokens(input_ids)
        for blk in self.model.layers:
            x = blk(x, cos, sin, start_pos)
        x = self.logit_positions(x, last_only, logit_rows)
        return self.lm_head(self.model.norm(x))
