"""Per-layer sensitivity of an encoder: how much each layer alone costs in embedding cosine when compressed.

- ``w8a8``: the layer's linears swapped for W8A8 modules (int8 activations per token, 7-bit weight codes per
  channel: what the ``w8a8-smoothquant`` recipe runs, without the smoothing), every other layer float;
- ``drop``: the layer removed (its output replaced by its input, a forward hook), as ``prune-layers`` would.

Each is one pass of the first search paragraphs per layer; the score is 1 − mean cosine to the source's
embeddings. The ranking is what the search uses: "keep the k most sensitive layers float under W8A8" and
"drop the k least sensitive layers".
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch

from miaotui.optimize.sensitivity import Sensitivity

KINDS = ("w8a8", "drop")
MEASURE = "1-cosine"


def _loss(loaded, texts: list[str], reference: np.ndarray) -> float:
    from miaotui.optimize.encoder_measure import embed, embedding_quality

    return 1.0 - embedding_quality(embed(loaded, texts), reference)["mean_cosine"]


@torch.no_grad()
def encoder_layer_sensitivity(source, texts: list[str], reference: np.ndarray, kind: str = "w8a8",
                              progress: Callable[[int, int], None] | None = None) -> Sensitivity:
    """1 − mean cosine per layer with that layer alone compressed. ``source``: the fused fp32
    ``LoadedEncoder`` (left unchanged: the work is done on a copy); ``reference``: its embeddings of
    ``texts``; ``progress(i, n)`` is called after each layer."""
    import dataclasses

    from miaotui.compress.quant.swap import set_module, swap_linears
    from miaotui.encoder.quantize import encoder_linears, symmetric_int8

    if kind not in KINDS:
        raise ValueError(f"encoder sensitivity kind must be one of {KINDS}, got {kind!r}")
    loaded = dataclasses.replace(source, model=copy.deepcopy(source.model))
    model = loaded.model
    n = len(model.layers)
    linears = encoder_linears(model)
    out = []
    for i in range(n):
        if kind == "w8a8":
            mine = {name: m for name, m in linears.items() if name.startswith(f"layers.{i}.")}
            swap_linears(model, {name: symmetric_int8(m.weight, 63) for name, m in mine.items()}, w8a8=True)
            try:
                out.append(_loss(loaded, texts, reference))
            finally:
                for name, m in mine.items():  # the float modules back, untouched
                    set_module(model, name, m)
        else:
            # a residual block whose output is its input: the layer is gone, the shapes are unchanged
            handle = model.layers[i].register_forward_hook(lambda mod, args, output: args[0])
            try:
                out.append(_loss(loaded, texts, reference))
            finally:
                handle.remove()
        if progress is not None:
            progress(i + 1, n)
    settings = {"weight_code_range": 63} if kind == "w8a8" else {}
    return Sensitivity(kind, out, {**settings, "texts": len(texts)}, MEASURE)
