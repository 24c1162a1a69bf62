"""Which weights a distillation run trains, the sparsity masks it keeps, and the switches that let an
inference-built model train.

Models are built for inference: every parameter has ``requires_grad=False``, attention may hold a KV cache,
quantized linears may take packed kernels that have no backward, and an encoder's layer stack may be
compiled. ``training_mode`` turns those off for the run and back on afterwards; the forward code itself is
unchanged (without a cache, attention is plain causal SDPA, which autograd goes through).

Trained: the float weights and biases of ``nn.Linear`` layers and of the norms (LayerNorm, RMSNorm).
Frozen: embeddings (and an output head tied to them, unless ``train_embeddings``), and quantized modules,
whose integer codes have no gradient: inputs still get gradients through their dequantized matmul, so
layers before them keep training.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from miaotui.models.base import RMSNorm

NORMS = (nn.LayerNorm, RMSNorm)


@dataclass
class Trainable:
    params: dict[str, nn.Parameter]  # name → parameter, each once (tied parameters share one entry)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # name → bool "may be non-zero"
    frozen_quantized: int = 0  # quantized modules left as they are

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params.values())

    @property
    def masked(self) -> int:
        """Weights held at exactly zero."""
        return sum(int((~m).sum()) for m in self.masks.values())

    def mask_grads(self) -> None:
        """Zero the gradient where a weight must stay zero (so it does not count in the clipping norm)."""
        for name, m in self.masks.items():
            g = self.params[name].grad
            if g is not None:
                g.mul_(m)

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Re-zero masked weights after an optimizer step (AdamW's update of a zero gradient is zero, but
        this keeps the guarantee whatever the optimizer does)."""
        for name, m in self.masks.items():
            self.params[name].mul_(m)


def _is_quantized(module: nn.Module) -> bool:
    from miaotui.compress.quant.qlinear import QuantLinear

    return isinstance(module, QuantLinear)


def select_trainable(model: nn.Module, train_embeddings: bool = False, keep_zeros: bool = True,
                     exclude: tuple[str, ...] = ()) -> Trainable:
    """The parameters to train, and a mask for every trained weight matrix that holds exact zeros at the start
    (unstructured or N:M pruning: those weights stay zero). A dense model has (almost) none. ``exclude``:
    module-name prefixes left frozen (e.g. an encoder's heads, which an embedding loss never reaches)."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    params: dict[str, nn.Parameter] = {}
    linear_weights: list[str] = []  # the only tensors pruning zeroes
    seen: set[int] = set()
    quantized = 0
    for mod_name, module in model.named_modules():
        if _is_quantized(module):
            quantized += 1
            continue
        if exclude and mod_name.startswith(exclude):
            continue
        if isinstance(module, nn.Embedding) and train_embeddings:
            candidates = [("weight", module.weight)]
        elif isinstance(module, (nn.Linear, *NORMS)):
            candidates = [(n, p) for n, p in module.named_parameters(recurse=False)]
        else:
            continue
        for pname, p in candidates:
            if p is None or not p.is_floating_point() or id(p) in seen:
                continue
            if id(p) in embedding_ids and not train_embeddings:
                continue  # a head tied to the embedding: frozen with it
            seen.add(id(p))
            name = f"{mod_name}.{pname}" if mod_name else pname
            params[name] = p
            if isinstance(module, nn.Linear) and pname == "weight":
                linear_weights.append(name)
    masks = {}
    if keep_zeros:
        for name in linear_weights:
            zero = params[name].detach() == 0
            if zero.any():
                masks[name] = ~zero
    return Trainable(params, masks, quantized)


@contextmanager
def training_mode(model: nn.Module, trainable: Trainable) -> Iterator[None]:
    """Gradients on for ``trainable`` only; no KV cache, no packed quantized kernels, no compiled stack.
    Everything is put back on exit, with ``requires_grad`` off again."""
    saved: list[tuple[object, str, object]] = []

    def swap(obj: object, attr: str, value: object) -> None:
        saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    for module in model.modules():
        if getattr(module, "kv_cache", None) is not None:  # decoders: attend over the input alone
            swap(module, "kv_cache", None)
        if _is_quantized(module) and getattr(module, "packed_rows", 0):
            swap(module, "packed_rows", 0)  # the packed CPU kernels have no backward
        if hasattr(module, "_body") and hasattr(module, "_run_layers"):
            swap(module, "_body", module._run_layers)  # a BertEncoder compiled for inference
    model.requires_grad_(False)
    for p in trainable.params.values():
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in trainable.params.values():
            p.requires_grad_(False)
            p.grad = None
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)
