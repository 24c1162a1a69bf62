"""Round-to-nearest for a whole model: every decoder linear on its own min/max grid, no calibration."""

from __future__ import annotations

from torch import nn

from miaotui.compress.layerwise import layer_stack
from miaotui.compress.quant.mixed import module_settings
from miaotui.compress.quant.qtensor import QuantizedWeight, quantize_rtn


def quantize_model_rtn(model: nn.Module, bits: int = 4, group_size: int | None = 128, symmetric: bool = False,
                       float_zero: bool = False, progress: bool = False,
                       overrides: dict[str, dict] | None = None) -> dict[str, QuantizedWeight]:
    """``{qualified name: QuantizedWeight}`` for every plain Linear inside the decoder layers (the embedding
    and the output head stay float). int8 per-channel symmetric: ``bits=8, group_size=None, symmetric=True``
    (``group_size=64``: one scale per 64 input columns).
    ``float_zero``: the [min, max] grid with a float zero point (see ``qtensor.group_params``).
    ``overrides``: per-module settings by glob (``quant/mixed.py``); a skipped module is left out."""
    from tqdm import tqdm

    stack = layer_stack(model)
    base = {"bits": bits, "group_size": group_size, "symmetric": symmetric, "float_zero": float_zero}
    out = {}
    for i in tqdm(range(len(stack.layers)), desc="rtn", unit="layer", disable=not progress):
        for name, lin in stack.linears(stack.layers[i]).items():
            qualified = f"{stack.prefix}.{i}.{name}"
            s = module_settings(qualified, base, overrides)
            if s is not None:
                out[qualified] = quantize_rtn(lin.weight, s["bits"], s["group_size"], s["symmetric"],
                                              s.get("float_zero", False))
    return out
