"""Per-layer sensitivity: how much each decoder layer alone costs in KL divergence when it is compressed.

- ``quant``: the layer's linears round-to-nearest quantized (int4, group 128 by default), every other
  layer left float; the weights are fake-quantized in place and put back.
- ``drop``: the layer removed (its output replaced by its input, a forward hook), as layer pruning would.

Each is one evaluation of the model per layer on the first windows of the search split, against the
source's reference. The ranking, not the absolute numbers, is what the search uses: "keep the k most
sensitive layers at int8" (mixed precision) and "drop the k least sensitive layers" (non-uniform pruning).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from miaotui.compress.layerwise import fake_quantize, layer_stack, restore
from miaotui.compress.quant.qtensor import quantize_rtn
from miaotui.eval.evaluate import evaluate
from miaotui.eval.reference import ReferenceLogits

KINDS = ("quant", "drop")


@dataclass
class Sensitivity:
    kind: str  # "quant" | "drop" (encoders: "w8a8" | "drop", ``encoder_sensitivity.py``)
    scores: list[float]  # per layer, the quality lost with only that layer compressed (higher: more sensitive)
    settings: dict
    measure: str = "kld"  # what ``scores`` holds: "kld" (decoders: mean KLD), "1-cosine" (encoders)

    @property
    def kld(self) -> list[float]:
        """The decoders' name for the scores (mean KL divergence per layer)."""
        return self.scores

    def most_sensitive(self, k: int) -> list[int]:
        """The ``k`` layers whose compression costs most (ties: the lower index first)."""
        order = sorted(range(len(self.scores)), key=lambda i: (-self.scores[i], i))
        return sorted(order[:k])

    def least_sensitive(self, k: int) -> list[int]:
        order = sorted(range(len(self.scores)), key=lambda i: (self.scores[i], i))
        return sorted(order[:k])

    def to_dict(self) -> dict:
        return {"kind": self.kind, "measure": self.measure, "scores": self.scores, "settings": self.settings}

    @classmethod
    def from_dict(cls, d: dict) -> "Sensitivity":
        """What ``to_dict`` wrote (or an older cache's ``kld`` list)."""
        return cls(d["kind"], d.get("scores", d.get("kld")), d["settings"], d.get("measure", "kld"))


def _kld(model, reference: ReferenceLogits) -> float:
    return float(evaluate(model, reference=reference).kld_mean)


@torch.no_grad()
def layer_sensitivity(model, reference: ReferenceLogits, kind: str = "quant", bits: int = 4,
                      group_size: int | None = 128,
                      progress: Callable[[int, int], None] | None = None) -> Sensitivity:
    """KLD per decoder layer with that layer alone compressed. ``model``: a fused float ``CausalLM``
    (left unchanged); ``reference``: the source's log-probs on the windows to measure on;
    ``progress(i, n)`` is called after each layer."""
    if kind not in KINDS:
        raise ValueError(f"sensitivity kind must be one of {KINDS}, got {kind!r}")
    stack = layer_stack(model)
    n = len(stack.layers)
    out = []
    for i in range(n):
        layer = stack.layers[i]
        if kind == "quant":
            qws = {f"{stack.prefix}.{i}.{name}": quantize_rtn(lin.weight, bits, group_size)
                   for name, lin in stack.linears(layer).items()}
            saved = fake_quantize(model, qws)
            try:
                out.append(_kld(model, reference))
            finally:
                restore(model, saved)
        else:
            # a residual block whose output is its input: the layer is gone, the shapes are unchanged
            handle = layer.register_forward_hook(lambda mod, args, output: args[0])
            try:
                out.append(_kld(model, reference))
            finally:
                handle.remove()
        if progress is not None:
            progress(i + 1, n)
    settings = {"bits": bits, "group_size": group_size} if kind == "quant" else {}
    return Sensitivity(kind, out, {**settings, "windows": int(reference.windows.shape[0]),
                                   "ctx": int(reference.windows.shape[1])})
