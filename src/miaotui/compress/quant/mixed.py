"""Per-module quantization settings (mixed precision): a step's defaults refined by globs on module names.

    overrides = {"model.layers.3.*": {"bits": 8}, "*.down_proj": {"group_size": 32}, "model.layers.0.*": {"skip": True}}
    module_settings("model.layers.3.mlp.down_proj", {"bits": 4, "group_size": 128}, overrides)
    # → {"bits": 8, "group_size": 32, ...}: every glob that matches applies, in the order given

Names are the fused model's qualified names (``model.layers.3.self_attn.qkv_proj``, ``...mlp.gate_up_proj``),
matched with ``fnmatch`` (``*`` crosses dots). ``skip: true`` leaves a module in float. The quantizers take
the overrides as given; ``recipe.run_quantize`` completes them first (an 8-bit module is symmetric, per
output channel unless it names a group size or inherits an int8 step's) and rejects globs that match nothing.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import Any

# what may differ from module to module (the rest of a step's parameters is per step)
PER_MODULE = {"bits", "group_size", "symmetric", "float_zero", "skip"}


def module_settings(name: str, base: dict[str, Any], overrides: dict[str, dict] | None) -> dict[str, Any] | None:
    """``base`` with every matching override applied in order; None when the module is to stay float."""
    out = dict(base)
    for pattern, params in (overrides or {}).items():
        if fnmatch.fnmatchcase(name, pattern):
            out.update(params)
    if out.pop("skip", False):
        return None
    return out


def unmatched(overrides: dict[str, dict] | None, names: Iterable[str]) -> list[str]:
    """Globs that match none of ``names`` (a typo would otherwise silently quantize everything alike)."""
    names = list(names)
    return [p for p in (overrides or {}) if not any(fnmatch.fnmatchcase(n, p) for n in names)]


def bits_histogram(specs: dict[str, dict]) -> dict[str, int]:
    """``{"int4": n, "int8": m, ...}`` over a module map (what the recipe record reports)."""
    hist: dict[str, int] = {}
    for spec in specs.values():
        hist[spec["kind"]] = hist.get(spec["kind"], 0) + 1
    return hist
