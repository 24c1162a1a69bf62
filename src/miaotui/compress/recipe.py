"""Recipes: a named or YAML chain of compression steps run in order on one model.

A YAML recipe::

    name: my-int4
    steps:
      - quantize: {method: gptq, bits: 4, group_size: 128, act_order: true}

Mixed precision: ``overrides`` maps globs on the fused module names to per-module settings, applied in order
(``quant/mixed.py``); the manifest records each module's format::

      - quantize: {method: rtn, bits: 4, group_size: 128, overrides: {"model.layers.3.*": {bits: 8}}}

Each step type is a function ``(Context, params) -> record`` named in ``STEPS`` (imported on first use);
the records land in the manifest. A step that changes shapes (structured pruning) records the new sizes
with ``ctx.update_config``; a step that swaps modules records their specs in ``ctx.modules``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from miaotui.errors import MiaotuiError

BUILTIN: dict[str, list[dict[str, Any]]] = {
    # int8 GPTQ with a scale per 128 columns (96 on 576-wide inputs) and the int8 head per 32 columns: the
    # cheapest setting measured to keep top-1 >= 98% and KLD <= 0.005 on SmolLM2 (RTN per channel: 96.5%).
    # Head g32 re-finds a GGUF Q8_0 embedding exactly; per-channel RTN int8 is {method: rtn, bits: 8}
    "int8": [{"quantize": {"method": "gptq", "bits": 8, "group_size": 128, "head_group_size": 32,
                           "act_order": True, "percdamp": 0.1}}],
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

# BERT-family encoders quantize with RTN or SmoothQuant only (encoder/quantize.py): a built-in whose decoder
# steps they cannot run has an encoder version under the same name
ENCODER_BUILTIN: dict[str, list[dict[str, Any]]] = {
    "int8": [{"quantize": {"method": "rtn", "bits": 8, "group_size": None, "symmetric": True}}],
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
    # called after every step with the LoadedModel; returns a quality dict recorded with the step
    step_eval: Callable[[Any], dict[str, Any]] | None = None
    # computed on first need; a caller running many recipes on one source passes them in to reuse them
    calib_tokens: torch.Tensor | None = None
    teacher_model: Any = None

    def update_config(self, **changes: Any) -> None:
        """Record a shape change (structured pruning) in the config the checkpoint will be saved with."""
        self.loaded.config.update(changes)

    def teacher(self) -> Any:
        """The uncompressed source (a LoadedModel, or a LoadedEncoder for encoders; fp32), loaded once on first
        use from the path the model being compressed came from (distillation's teacher)."""
        if self.teacher_model is None:
            from miaotui.loading import load

            self.teacher_model = load(str(self.loaded.path), "fp32", progress=False)
            self.teacher_model.model.fuse()
        return self.teacher_model

    def calib_ids(self) -> torch.Tensor:
        if self.calib_tokens is None:
            from miaotui.compress.calib import calibration_tokens

            c = self.calibration
            self.calib_tokens = calibration_tokens(self.loaded, c.file, c.samples, c.seq_len, c.seed,
                                                   progress=self.progress)
        return self.calib_tokens


QUANT_PARAMS = {
    "rtn": {"bits", "group_size", "symmetric", "float_zero"},
    "gptq": {"bits", "group_size", "symmetric", "act_order", "percdamp", "block_size"},
    "awq": {"bits", "group_size", "symmetric", "n_grid", "clip", "duo_scaling", "scale_v_o"},
    "smoothquant": {"alpha"},
}


# per-module settings an ``overrides`` glob may change, by method (SmoothQuant's W8A8 has no choices)
OVERRIDE_PARAMS = {"rtn": {"bits", "group_size", "symmetric", "float_zero", "skip"},
                   "gptq": {"bits", "group_size", "symmetric", "skip"},
                   "awq": {"bits", "group_size", "symmetric", "skip"}}


def _group_value(where: str, value: Any, name: str = "group_size") -> int | None:
    """A recipe's group size: null or -1 (one group per output channel) or a positive integer."""
    if value in (None, -1):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise RecipeError(f"{where}: {name} must be null (per output channel) or a positive integer, "
                          f"got {value!r}")
    return value


def _int8_format(where: str, given: dict[str, Any], inherit_group: bool = False) -> dict[str, Any]:
    """An 8-bit module is symmetric (``Int8Linear``), per output channel (``group_size`` null) or per group of
    input columns: fill in what ``given`` leaves unsaid, refuse what it contradicts. ``inherit_group``: an
    override that names no group keeps the step's (an int8 step's group); otherwise it means per channel."""
    group = _group_value(where, given.get("group_size", None))
    if given.get("symmetric", True) is not True:
        raise RecipeError(f"{where}: symmetric must be true with bits 8 (int8 weights have no zero point)")
    if given.get("float_zero"):
        raise RecipeError(f"{where}: float_zero does not apply to bits 8 (symmetric, no zero point)")
    out = {**given, "symmetric": True, "float_zero": False}
    if "group_size" in given or not inherit_group:
        out["group_size"] = group
    return out


def check_int8_groups(where: str, widths: dict[str, int], base: dict[str, Any],
                      overrides: dict[str, dict] | None) -> None:
    """Refuse, before any work, an int8 group that a layer's width rounds (``qtensor.check_group``) to a size
    the native kernel cannot take: 576 wide with 64 stays 64, but 100 wide with 64 becomes 50. ``widths``:
    in_features by qualified module name."""
    from miaotui.compress.quant.mixed import module_settings
    from miaotui.compress.quant.qtensor import check_group
    from miaotui.kernels import INT8_GROUP_MULTIPLE

    for name, width in widths.items():
        s = module_settings(name, base, overrides)
        if s is None or s.get("bits") != 8 or s.get("group_size") is None:
            continue
        g = check_group(width, s["group_size"])
        if g != width and g % INT8_GROUP_MULTIPLE:
            raise RecipeError(f"{where}: int8 group_size {s['group_size']} becomes {g} on {name} "
                              f"({width} inputs; a group must divide it), not a multiple of "
                              f"{INT8_GROUP_MULTIPLE}: choose a group size whose rounding is, or null (per channel)")


def quant_overrides(method: str, p: dict[str, Any]) -> dict[str, dict] | None:
    """Validate the step's base settings and its ``overrides`` (glob → per-module settings); returns the
    overrides completed so that each names a runnable format (see ``_int8_format``)."""
    raw = p.pop("overrides", None)
    if p.get("bits") == 8 and method in OVERRIDE_PARAMS:
        fmt = _int8_format(f"quantize/{method}", p)
        p["group_size"], p["symmetric"] = fmt["group_size"], fmt["symmetric"]
    if raw is None:
        return None
    if method not in OVERRIDE_PARAMS:
        raise RecipeError(f"quantize/{method}: overrides are not supported (choose from "
                          f"{', '.join(OVERRIDE_PARAMS)} for per-module settings)")
    if not isinstance(raw, dict) or not raw:
        raise RecipeError(f"quantize/{method}: overrides must be a non-empty mapping of module-name glob → "
                          "settings, e.g. {'model.layers.0.*': {bits: 8}}")
    out = {}
    for glob, settings in raw.items():
        where = f"quantize/{method}: overrides[{glob!r}]"
        if not isinstance(glob, str) or not isinstance(settings, dict) or not settings:
            raise RecipeError(f"{where}: must map a module-name glob to a non-empty mapping of settings")
        unknown = set(settings) - OVERRIDE_PARAMS[method]
        if unknown:
            raise RecipeError(f"{where}: unknown parameter(s) {', '.join(sorted(unknown))} "
                              f"(allowed: {', '.join(sorted(OVERRIDE_PARAMS[method]))})")
        if settings.get("skip"):
            out[glob] = {"skip": True}
            continue
        bits = settings.get("bits", p.get("bits", 4))
        if bits not in (4, 8):
            raise RecipeError(f"{where}: bits must be 4 or 8, got {bits}")
        settings = dict(settings)
        if bits == 8:  # in an int8 step a glob without group_size keeps the step's group
            settings = _int8_format(where, settings, inherit_group=p.get("bits") == 8)
        elif settings.get("bits") == 4 and p.get("bits") == 8:  # a 4-bit module in an int8 step: int4 defaults
            settings = {"group_size": 128, "symmetric": False, **settings}
        if method != "rtn":
            settings.pop("float_zero", None)
        out[glob] = settings
    return out


def run_quantize(ctx: Context, params: dict[str, Any]) -> dict[str, Any]:
    """The ``quantize`` step: one method for every decoder linear, with per-module ``overrides`` by glob
    (mixed precision: ``overrides: {"model.layers.3.*": {bits: 8}}``; ``skip: true`` keeps a module float).
    The output head is int8 RTN (``head: int8``, the default; ``none`` keeps it float), per group of
    ``head_group_size`` input columns; unset, it is the step's group in an 8-bit step, else per channel."""
    from miaotui.compress.quant.mixed import bits_histogram, unmatched
    from miaotui.compress.quant.swap import layer_linears, quantize_head, swap_linears
    from miaotui.loading.encoder import LoadedEncoder

    if isinstance(ctx.loaded, LoadedEncoder):  # BERT family: its own linears, W8A8 without SmoothQuant's folds
        from miaotui.encoder.quantize import run_quantize_encoder

        return run_quantize_encoder(ctx, params)
    p = dict(params)
    method = p.pop("method", "rtn")
    head = p.pop("head", "int8")
    head_group_given = "head_group_size" in p
    head_group = _group_value("quantize", p.pop("head_group_size", None), "head_group_size")
    if method not in QUANT_PARAMS:
        raise RecipeError(f"quantize: unknown method {method!r} (choose from {', '.join(QUANT_PARAMS)})")
    unknown = set(p) - QUANT_PARAMS[method] - {"overrides"}
    if unknown:
        allowed = QUANT_PARAMS[method] | {"head", "head_group_size", "overrides"}
        raise RecipeError(f"quantize/{method}: unknown parameter(s) {', '.join(sorted(unknown))} "
                          f"(allowed: {', '.join(sorted(allowed))})")
    if p.get("bits", 4 if method != "smoothquant" else 8) not in (4, 8):
        raise RecipeError(f"quantize/{method}: bits must be 4 or 8, got {p['bits']}")
    if head not in ("int8", "none", None):
        raise RecipeError(f"quantize: head must be 'int8' or 'none', got {head!r}")
    if head_group is not None and head != "int8":
        raise RecipeError(f"quantize: head_group_size applies to an int8 head only (head is {head!r})")
    overrides = quant_overrides(method, p)
    if not head_group_given and p.get("bits") == 8 and method in OVERRIDE_PARAMS:
        head_group = p["group_size"]  # an int8 step's head follows its layers (null: per channel)
    model = ctx.loaded.model
    if overrides:
        model.fuse()  # the globs name the fused modules, as the manifest does
        missing = unmatched(overrides, layer_linears(model))
        if missing:
            raise RecipeError(f"quantize/{method}: overrides glob(s) {', '.join(map(repr, missing))} match no "
                              f"decoder linear (names look like {next(iter(layer_linears(model)), '?')!r})")
        p["overrides"] = overrides
    if method in OVERRIDE_PARAMS:
        base = {"bits": p.get("bits", 4), "group_size": p.get("group_size", 128)}
        check_int8_groups(f"quantize/{method}", {n: m.in_features for n, m in layer_linears(model).items()},
                          base, overrides)
    head_linear = getattr(model, "lm_head", None)
    if head == "int8" and isinstance(head_linear, torch.nn.Linear):
        check_int8_groups("quantize (head_group_size)", {"lm_head": head_linear.in_features},
                          {"bits": 8, "group_size": head_group}, None)
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
    if head == "int8" and isinstance(model.lm_head, torch.nn.Linear):
        spec.update(quantize_head(model, head_group))
    ctx.modules.update(spec)
    groups = sorted({s.get("group_size") for s in spec.values() if s.get("group_size")})
    record = {"modules": len(spec), "group_sizes_used": groups}
    if overrides:
        record["kinds"] = bits_histogram(spec)
    return record


# step type → "module:function"; imported on first use so a recipe pays only for the steps it runs
STEPS: dict[str, str] = {
    "quantize": "miaotui.compress.recipe:run_quantize",
    "prune": "miaotui.compress.prune.unstructured:run_prune",  # magnitude / wanda / sparsegpt, N:M, OWL
    "prune-heads": "miaotui.compress.prune.structured:run_prune_heads",
    "prune-channels": "miaotui.compress.prune.structured:run_prune_channels",
    "prune-layers": "miaotui.compress.prune.structured:run_prune_layers",
    "lowrank": "miaotui.compress.lowrank:run_lowrank",
    "distill": "miaotui.compress.distill:run_distill",
}


def step_function(kind: str) -> Callable[[Context, dict[str, Any]], dict[str, Any]]:
    import importlib

    module, _, func = STEPS[kind].partition(":")
    return getattr(importlib.import_module(module), func)


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
    """Run every step in order on ``ctx.loaded.model`` (fused, in place); returns one record per step.
    A built-in run on an encoder takes its encoder version (``ENCODER_BUILTIN``), written back into
    ``recipe["steps"]`` so that the manifest records what ran."""
    from miaotui.loading.encoder import LoadedEncoder

    name = recipe.get("name")
    if isinstance(ctx.loaded, LoadedEncoder) and name in ENCODER_BUILTIN and recipe["steps"] == BUILTIN[name]:
        recipe["steps"] = ENCODER_BUILTIN[name]
    ctx.loaded.model.fuse()
    records = []
    for step in recipe["steps"]:
        (kind, params), = step.items()
        t0 = time.perf_counter()
        record = step_function(kind)(ctx, dict(params or {}))
        record = {"step": kind, "params": params or {}, **record, "seconds": round(time.perf_counter() - t0, 2)}
        if ctx.step_eval is not None:  # each step's quality lands in the manifest
            record["quality"] = ctx.step_eval(ctx.loaded)
        records.append(record)
    return records
