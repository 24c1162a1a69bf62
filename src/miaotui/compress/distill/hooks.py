"""Reading the output of chosen layers during a forward, for the hidden-state loss."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


@contextmanager
def layer_outputs(stack: nn.ModuleList, indices: list[int]) -> Iterator[dict[int, torch.Tensor]]:
    """``{index: output}`` of the layers ``indices``, filled by every forward inside the block (the last one
    wins). Under autograd the outputs keep their graph, so a loss on them trains the layers below."""
    out: dict[int, torch.Tensor] = {}

    def hook(i: int):
        def fn(module, inputs, output):
            out[i] = output[0] if isinstance(output, tuple) else output
        return fn

    handles = [stack[i].register_forward_hook(hook(i)) for i in indices]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()
