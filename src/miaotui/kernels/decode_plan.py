"""The fused native decode step (``csrc/decode_step.cpp``): one C++ call per token for a Llama-family model.

``NativeDecode.build(model)`` reads a prepared model (fused q/k/v and gate/up, a static fp32/bf16 KV cache
set up) into a ``torch.classes.miaotui.DecodePlan`` that holds references to the model's own tensors:
nothing is copied, and the cache the eager prefill wrote is the cache the step reads and extends. It returns
None, with the reason, for anything the step does not cover, and the caller keeps the PyTorch path:

- an architecture other than ``LlamaForCausalLM`` (Llama, SmolLM2, Mistral, Qwen2);
- a linear that is not dense fp32/bf16, per-channel or grouped int8 (``Int8Linear``) or int4 with
  32-multiple groups (``Int4Linear``): W8A8, sparse, low-rank and tensor-parallel modules;
- an int8 KV cache, an unfused projection, a head_dim that is not a multiple of 16.

``MIAOTUI_NATIVE_STEP=0`` turns it off (``MIAOTUI_NATIVE=0`` does too: no native kernels at all).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from miaotui import kernels

ENV = "MIAOTUI_NATIVE_STEP"
F32, BF16, INT8, INT4 = 0, 1, 2, 3


def _dense_types() -> tuple[type, ...]:
    from miaotui.engine.prepare import GemvUpcastLinear, UpcastLinear
    from miaotui.kernels.linear import GemvLinear

    return nn.Linear, GemvLinear, UpcastLinear, GemvUpcastLinear


def _fp32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().float().contiguous()


def _linear_args(m: nn.Module) -> tuple | str:
    """(kind, weight, scale, zero, group, bias) for ``DecodePlan.add_linear``, or why the module is not covered."""
    from miaotui.compress.quant.qlinear import Int4Linear, Int8Linear

    bias = _fp32(getattr(m, "bias", None))
    if type(m) in _dense_types():
        w = m.weight.detach()
        if w.dtype not in (torch.float32, torch.bfloat16) or not w.is_contiguous():
            return f"{type(m).__name__} with a {w.dtype} weight"
        return (F32 if w.dtype == torch.float32 else BF16), w, None, None, 0, bias
    if type(m) is Int8Linear:
        return INT8, m.qweight, m.scale.float().contiguous(), None, 0, bias
    if type(m) is Int4Linear and m.group_size % kernels.INT4_GROUP_MULTIPLE == 0:
        return INT4, m.qweight, m.scale.contiguous(), m.zero.contiguous(), m.group_size, bias
    return f"a {type(m).__name__} linear"


def decode_path(model: nn.Module, compile: bool) -> str:
    """What one sequence of ``model`` decodes with ("native step", "compiled" or "eager"), for labels:
    benchmark tables name the path their figures come from. Sets up a small cache if there is none."""
    from miaotui.engine.generate import ensure_cache

    ensure_cache(model, 16)
    step, _ = NativeDecode.build(model)
    return "native step" if step is not None else ("compiled" if compile else "eager")


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


class NativeDecode:
    """``__call__(ids (1, T), pos) → logits (T, V)`` in fp32: T tokens of one sequence through the whole
    model in one C++ call (T = 1: a decode step; a few: a speculative verify)."""

    def __init__(self, model: nn.Module, plan: torch.ScriptObject, cache: object):
        self.model, self.plan = model, plan
        self.cache = cache  # the first layer's cache object: a new one (setup_cache) needs a new plan

    @classmethod
    def build(cls, model: nn.Module) -> tuple["NativeDecode | None", str]:
        """(the step, "") or (None, why it does not apply)."""
        from miaotui.models.base import KVCache
        from miaotui.models.llama import LlamaForCausalLM

        if not enabled():
            return None, f"{ENV}=0"
        if type(model) is not LlamaForCausalLM:
            return None, f"no fused step for {type(model).__name__}"
        if model.device.type != "cpu":
            return None, "the fused step runs on CPU"
        if not kernels.available():
            return None, "native kernels unavailable"
        a = model.args
        if a.head_dim % 16:
            return None, f"head_dim {a.head_dim} is not a multiple of 16"
        layers = model.model.layers
        caches = [blk.self_attn.kv_cache for blk in layers]
        if any(type(c) is not KVCache for c in caches):
            return None, "needs the static KV cache (setup_cache)"
        if caches[0].quantized:
            return None, "int8 KV cache"
        first = layers[0].self_attn
        n_kv = first.qkv_split[1] // a.head_dim if first.qkv_proj is not None else 0
        plan = torch.classes.miaotui.DecodePlan(
            first.qkv_split[0] // a.head_dim if first.qkv_proj is not None else a.num_attention_heads,
            n_kv or a.num_key_value_heads, a.head_dim, float(a.rms_norm_eps), a.sliding_window or 0,
            model.rope_cos.float().contiguous(), model.rope_sin.float().contiguous())
        try:  # the plan checks every shape; one it cannot run (e.g. layers pruned to different head counts)
            for blk in layers:
                attn, mlp = blk.self_attn, blk.mlp
                if attn.qkv_proj is None or mlp.gate_up_proj is None:
                    return None, "unfused q/k/v or gate/up projections"
                ids = []
                for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
                    args = _linear_args(m)
                    if isinstance(args, str):
                        return None, args
                    ids.append(plan.add_linear(*args))
                plan.add_layer(_fp32(blk.input_layernorm.weight), _fp32(blk.post_attention_layernorm.weight),
                               attn.kv_cache.k, attn.kv_cache.v, *ids)
            head = _linear_args(model.lm_head)
            if isinstance(head, str):
                return None, f"head: {head}"
            plan.set_head(_fp32(model.model.norm.weight), plan.add_linear(*head))
        except RuntimeError as e:  # keeps the PyTorch path, which runs any layout the model file does
            return None, f"layout the fused step does not cover: {str(e).splitlines()[0]}"
        return cls(model, plan, caches[0]), ""

    def current(self) -> bool:
        """Still bound to the model's cache (a new ``setup_cache`` allocates new tensors)."""
        return self.model.model.layers[0].self_attn.kv_cache is self.cache

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        """ids (1, T) at positions pos .. pos + T - 1 → logits (T, V) fp32: T = 1 is a decode step
        (logits (1, V), as ``Runner.decode`` returns for one sequence); T > 1 a speculative verify."""
        x = self.model.model.embed_tokens(ids.reshape(1, -1)).reshape(ids.numel(), -1).float().contiguous()
        return self.plan.step(x, int(pos))
