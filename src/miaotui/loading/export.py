"""``compress --export hf``: a dequantized Hugging Face folder that transformers loads as it is.

The inverse of loading: quantized linears are dequantized, fused projections split back (q/k/v,
gate/up), GPT-2's linears transposed back to its Conv1D layout, a tied head dropped (transformers ties it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from miaotui.compress.quant.qlinear import QuantLinear
from miaotui.compress.quant.swap import Int8Embedding


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight as a dense fp32 tensor under our (fused) module names."""
    sd: dict[str, torch.Tensor] = {}
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, QuantLinear):
            sd[prefix + "weight"] = m.dequantize()
            if m.bias is not None:
                sd[prefix + "bias"] = m.bias.float()
        elif isinstance(m, Int8Embedding):
            sd[prefix + "weight"] = m.head[0].dequantize()
        else:
            for pname, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
                if pname in m._non_persistent_buffers_set:
                    continue
                sd[prefix + pname] = t.detach().float() if t.is_floating_point() else t.detach()
    return sd


def _split_fused(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in sd.items():
        if ".qkv_proj." in name:
            attn = model.get_submodule(name.split(".qkv_proj.")[0])
            for part, piece in zip(("q_proj", "k_proj", "v_proj"), t.split(attn.qkv_split, dim=0)):
                out[name.replace("qkv_proj", part)] = piece.contiguous()
        elif ".gate_up_proj." in name:
            gate, up = t.chunk(2, dim=0)
            out[name.replace("gate_up_proj", "gate_proj")] = gate.contiguous()
            out[name.replace("gate_up_proj", "up_proj")] = up.contiguous()
        else:
            out[name] = t
    return out


def export_hf(model: nn.Module, config: dict, tokenizer, out_dir: str | os.PathLike) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = _split_fused(model, dense_state_dict(model))
    if config.get("tie_word_embeddings", config.get("model_type") == "gpt2"):
        sd.pop("lm_head.weight", None)
    if config.get("model_type") == "gpt2":
        conv1d = getattr(type(model), "_CONV1D", ())
        sd = {k: v.t().contiguous() if k.endswith(conv1d) else v for k, v in sd.items()}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    cfg.setdefault("torch_dtype", "float32")
    (out / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
