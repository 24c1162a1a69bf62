"""What pruning works on: the original projections of a decoder layer, even where a fused linear holds
several of them (q/k/v in ``qkv_proj``, gate/up in ``gate_up_proj``), as row ranges of that linear.

Pruners that rank over a whole projection (magnitude, SparseGPT's blocks) rank each part on its own, so a
fused model prunes exactly like the unfused one.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

from miaotui.errors import MiaotuiError


@dataclass(frozen=True)
class Target:
    name: str    # the original projection, relative to the decoder layer: "self_attn.q_proj"
    linear: str  # the module holding its weight, relative to the layer: "self_attn.qkv_proj"
    rows: slice  # its output rows in that module


def supported(model: nn.Module) -> bool:
    from miaotui.models.gpt2 import GPT2LMHeadModel
    from miaotui.models.llama import LlamaForCausalLM

    return isinstance(model, (LlamaForCausalLM, GPT2LMHeadModel))


def check_supported(model: nn.Module) -> None:
    if not supported(model):
        raise MiaotuiError(f"pruning supports decoder models of the llama family (Llama, Mistral, Qwen2, SmolLM) "
                           f"and GPT-2, not {type(model).__name__}")


def _parts(layer: nn.Module, name: str, lin: nn.Linear) -> list[tuple[str, int]]:
    """(original name, rows) of each projection fused into ``name``, in row order."""
    if name.endswith("qkv_proj"):
        prefix = name[: -len("qkv_proj")]
        return list(zip([f"{prefix}q_proj", f"{prefix}k_proj", f"{prefix}v_proj"],
                        layer.get_submodule(name.rsplit(".", 1)[0]).qkv_split))
    if name.endswith("gate_up_proj"):  # gate rows, then up rows (MLP.forward chunks it in two)
        prefix = name[: -len("gate_up_proj")]
        half = lin.out_features // 2
        return [(f"{prefix}gate_proj", half), (f"{prefix}up_proj", half)]
    return [(name, lin.out_features)]


def layer_targets(linears: dict[str, nn.Linear], layer: nn.Module) -> list[Target]:
    """Every original projection among a layer's plain (float, not yet quantized) linears."""
    out = []
    for name, lin in linears.items():
        start = 0
        for part, n in _parts(layer, name, lin):
            out.append(Target(part, name, slice(start, start + n)))
            start += n
    return out


def matches(target: Target, patterns: list[str] | None) -> bool:
    """A pattern (shell-style) matches a projection's relative name or its last component:
    "q_proj", "self_attn.*", "*down_proj"."""
    if patterns is None:
        return True
    leaf = target.name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(target.name, p) or fnmatch.fnmatchcase(leaf, p) for p in patterns)
