"""Recipes: a named or YAML chain of compression steps run in order on one model.

A YAML recipe::

    name: my-int4
    steps:
      - quantize: {method: gptq, bits: 4, group_size: 128, act_order: true}

Each step type is a function ``(Context, params) -> record``; the records land in the manifest. Other
step types (pruning, distillation, low-rank) register themselves in ``STEPS`` the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from miaotui.errors import MiaotuiError

BUILTIN: dict[str, list[dict[str, Any]]] = {
    "int8": [{"quantize": {"method": "rtn", "bits": 8, "group_size": None, "symmetric": True}}],
    "int4-rtn": [{"quantize": {"method": "rtn", "bits": 4, "group_size": 128}}],
    # stronger damping than the paper's 0.01: with a few thousand calibration tokens GPTQ otherwise fits
    # the calibration text and loses to RTN on held-out text (measured on SmolLM2, docs/BENCHMARKS.md)
    "int4-gptq": [{"quantize": {"method": "gptq", "bits": 4, "group_size": 128, "act_order": True,
                                "percdamp": 0.1}}],
    "int4-awq": [{"quantize": {"method": "awq", "bits": 4, "group_size": 128}}],
    "w8a8-smoothquant": [{"quantize": {"method": "smoothquant", "alpha": 0.5}}],
    # group 32 with a float zero point: re-finds GGUF Q4_1 weights exactly (the embedded default model)
    "int4-g32": [{"quantize": {"method": "rtn", "bits": 4, "group_size": 32, "float_zero": True}}],
}


class RecipeError(MiaotuiError):
    pass


@dataclass
class Calibration:
    file: str | None = None
    samples: int | None = None
    seq_len: int | None = None
    seed: int = 0


@dataclass
class Context:
    """What steps share: the model being compressed, calibration (built once, lazily), the module map."""

    loaded: Any  # LoadedModel
    calibration: Calibration = field(default_factory=Calibration)
    progress: bool = True
    modules: dict[str, dict] = field(default_factory=dict)
    _ids: torch.Tensor | None = None

    def calib_ids(self) -> torch.Tensor:
        if self._ids is None:
            from miaotui.compress.calib import calibration_tokens

            c = self.calibration
            self._ids = calibration_tokens(self.loaded, c.file, c.samples, c.seq_len, c.seed, progress=self.progress)
        return self._ids


QUANT_PARAMS = {
    "rtn": {"bits", "group_size", "symmetric", "float_zero"},
    "gptq": {"bits", "group_size", "symmetric", "act_order", "percdamp", "block_size"},
    "awq": {"bits", "group_size", "symmetric", "n_grid", "clip", "duo_scaling", "scale_v_o"},
    "smoothquant": {"alpha"},
}


def run_quantize(ctx: Context, params: dict[str, Any]) -> dict[str, Any]:
    from miaotui.compress.quant.swap import quantize_head, swap_linears

    p = dict(params)
    method = p.pop("method", "rtn")
    head = p.pop("head", "int8")
    if method not in QUANT_PARAMS:
        raise RecipeError(f"quantize: unknown method {method!r} (choose from {', '.join(QUANT_PARAMS)})")
    unknown = set(p) - QUANT_PARAMS[method]
    if unknown:
        raise RecipeError(f"quantize/{method}: unknown parameter(s) {', '.join(sorted(unknown))} "
                          f"(allowed: {', '.join(sorted(QUANT_PARAMS[method] | {'head'}))})")
    if p.get("bits", 4 if method != "smoothquant" else 8) not in (4, 8):
        raise RecipeError(f"quantize/{method}: bits must be 4 or 8, got {p['bits']}")
    if head not in ("int8", "none", None):
        raise RecipeError(f"quantize: head must be 'int8' or 'none', got {head!r}")
    model = ctx.loaded.model
    if method == "rtn":
        from miaotui.compress.quant.rtn import quantize_model_rtn

        qweights = quantize_model_rtn(model, progress=ctx.progress, **p)
    elif method == "gptq":
        from miaotui.compress.quant.gptq import quantize_model_gptq

        qweights = quantize_model_gptq(model, ctx.calib_ids(), progress=ctx.progress, **p)
    elif method == "awq":
        from miaotui.compress.quant.awq import quantize_model_awq

        qweights = quantize_model_awq(model, ctx.calib_ids(), progress=ctx.progress, **p)
    else:
        from miaotui.compress.quant.smoothquant import quantize_model_smoothquant

        qweights = quantize_model_smoothquant(model, ctx.calib_ids(), progress=ctx.progress, **p)
    if not qweights:
        raise RecipeError("quantize: the model has no dense decoder linears left to quantize")
    spec = swap_linears(model, qweights, w8a8=method == "smoothquant")
    if head == "int8" and type(model.lm_head) is torch.nn.Linear:
        spec.update(quantize_head(model))
    ctx.modules.update(spec)
    groups = sorted({s.get("group_size") for s in spec.values() if s.get("group_size")})
    return {"modules": len(spec), "group_sizes_used": groups}


STEPS: dict[str, Callable[[Context, dict[str, Any]], dict[str, Any]]] = {"quantize": run_quantize}


def load_recipe(name_or_file: str) -> dict[str, Any]:
    """``{"name": ..., "steps": [{type: params}, ...]}`` from a built-in name or a YAML file."""
    if name_or_file in BUILTIN:
        return {"name": name_or_file, "steps": BUILTIN[name_or_file]}
    path = Path(name_or_file).expanduser()
    if not path.is_file():
        raise RecipeError(f"{name_or_file!r} is neither a built-in recipe ({', '.join(BUILTIN)}) nor a file")
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("steps"), list) or not data["steps"]:
        raise RecipeError(f"{path}: a recipe is a mapping with a non-empty 'steps' list")
    for i, step in enumerate(data["steps"]):
        if not isinstance(step, dict) or len(step) != 1:
            raise RecipeError(f"{path}: step {i + 1} must be one mapping like '- quantize: {{...}}'")
        (kind, params), = step.items()
        if kind not in STEPS:
            raise RecipeError(f"{path}: step {i + 1}: unknown step {kind!r} (known: {', '.join(STEPS)})")
        if params is not None and not isinstance(params, dict):
            raise RecipeError(f"{path}: step {i + 1}: parameters of {kind!r} must be a mapping")
    return {"name": data.get("name", path.stem), "steps": data["steps"]}


def run_recipe(ctx: Context, recipe: dict[str, Any]) -> list[dict[str, Any]]:
    """Run every step in order on ``ctx.loaded.model`` (fused, in place); returns one record per step."""
    ctx.loaded.model.fuse()
    records = []
    for step in recipe["steps"]:
        (kind, params), = step.items()
        t0 = time.perf_counter()
        record = STEPS[kind](ctx, dict(params or {}))
        records.append({"step": kind, "params": params or {}, **record,
                        "seconds": round(time.perf_counter() - t0, 2)})
    return records
