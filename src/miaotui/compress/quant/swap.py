"""Put quantized linears into a model in place of its ``nn.Linear`` layers (and quantize its output head)."""

from __future__ import annotations

import torch
from torch import nn

from miaotui.compress.lowrank import FactorizedLinear
from miaotui.compress.quant.qlinear import Int4Linear, Int8Linear, QuantLinear, W8A8Linear
from miaotui.compress.quant.qtensor import QuantizedWeight, quantize_rtn
from miaotui.models.base import dense_linears

KINDS = {"int8": Int8Linear, "int4": Int4Linear, "w8a8": W8A8Linear}


def layer_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The decoder layers' dense linears by qualified name (what quantization and pruning act on)."""
    return {name: m for name, m in dense_linears(model).items() if ".layers." in f".{name}"}


def kind_for(qw: QuantizedWeight, w8a8: bool = False) -> str:
    if w8a8:
        return "w8a8"
    return "int4" if qw.bits == 4 else "int8"


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def swap_linears(model: nn.Module, qweights: dict[str, QuantizedWeight], w8a8: bool = False) -> dict[str, dict]:
    """Replace each named linear with its quantized module; returns the module map for the manifest."""
    spec = {}
    for name, qw in qweights.items():
        old = model.get_submodule(name)
        if tuple(old.weight.shape) != qw.shape:
            raise ValueError(f"{name}: quantized shape {qw.shape} != weight shape {tuple(old.weight.shape)}")
        kind = kind_for(qw, w8a8)
        new = KINDS[kind].from_quantized(qw, old.bias.detach() if old.bias is not None else None)
        set_module(model, name, new)
        spec[name] = module_spec(new)
    return spec


def module_spec(m: QuantLinear | FactorizedLinear) -> dict:
    if isinstance(m, FactorizedLinear):
        return m.spec()
    spec = {"kind": m.kind, "in_features": m.in_features, "out_features": m.out_features,
            "bias": m.bias is not None}
    if isinstance(m, Int4Linear) or (isinstance(m, Int8Linear) and m.grouped):
        spec["group_size"] = m.group_size  # absent for per-channel int8 (checkpoints written before groups)
    return spec


def build_module(spec: dict) -> QuantLinear | FactorizedLinear:
    if spec["kind"] == FactorizedLinear.kind:  # low-rank B·A (compress/lowrank.py)
        return FactorizedLinear.from_spec(spec)
    cls = KINDS[spec["kind"]]
    args = (spec["in_features"], spec["out_features"])
    if cls is Int4Linear:
        return Int4Linear(*args, spec["group_size"], bias=spec["bias"])
    if cls is Int8Linear:
        return Int8Linear(*args, bias=spec["bias"], group_size=spec.get("group_size"))
    return cls(*args, bias=spec["bias"])


class Int8Embedding(nn.Module):
    """An embedding that reads rows of an int8 head's weight (tied models keep one int8 copy)."""

    def __init__(self, head: Int8Linear, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.head, self.dtype = [head], dtype  # a list: not a submodule, so its buffers are saved once

    @property
    def weight(self) -> torch.Tensor:  # what code reading ``embed.weight`` (shape, dtype, device) expects
        head = self.head[0]
        return head.qweight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head[0].dequantize_rows(ids, self.dtype)


def tied_embedding_name(model: nn.Module) -> str | None:
    head = getattr(model, "lm_head", None)
    if head is None or not isinstance(head, nn.Linear):
        return None
    return next((n for n, m in model.named_modules() if isinstance(m, nn.Embedding) and m.weight is head.weight),
                None)


def quantize_head(model: nn.Module, group_size: int | None = None) -> dict[str, dict]:
    """int8 symmetric RTN on ``lm_head`` (on SmolLM2 it is a fifth of the weights, read every token), per
    output channel (``group_size`` None) or per group of input columns (rounded to a divisor by
    ``qtensor.check_group``).

    A tied input embedding then reads its rows from the same int8 tensor."""
    head = model.lm_head
    tied = tied_embedding_name(model)
    qw = quantize_rtn(head.weight.detach(), bits=8, group_size=group_size, symmetric=True)
    new = Int8Linear.from_quantized(qw, head.bias.detach() if head.bias is not None else None)
    model.lm_head = new
    spec = {"lm_head": module_spec(new)}
    if tied:
        dtype = model.get_submodule(tied).weight.dtype
        set_module(model, tied, Int8Embedding(new, dtype))
        spec["lm_head"]["tied_embedding"] = tied
    return spec
