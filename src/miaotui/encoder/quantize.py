"""The ``quantize`` recipe step for BERT-family encoders: weight-only int8/int4 (RTN) and W8A8.

Same modules and checkpoint format as the decoders (``compress/quant/qlinear.py``: ``Int8Linear``,
``Int4Linear``, ``W8A8Linear``); what differs is the walk (each layer's ``attention.qkv``, ``attention.out``,
``intermediate``, ``output``) and the calibration (texts through ``Encoder.encode``, not token windows).

W8A8 ("smoothquant" in a recipe), as it runs on a CPU without VNNI:

- activations: int8 per token, quantized at run time (``W8A8Linear``);
- weights: int8 storage, per output channel, codes within ±63 by default (``weight_bits: 7``). FBGEMM's AVX2
  kernel adds pairs of u8 x s8 products in int16 and saturates beyond that; with 7-bit codes it is exact
  and 1.5-2x faster than fp32 here. ``weight_bits: 8`` keeps full codes (exact on the int_mm/float paths);
- smoothing: SmoothQuant divides a linear's input channels by ``s`` and folds ``s`` into whatever produced
  them. In a post-norm BERT the LayerNorm output feeds the residual too, so only the attention output
  projection qualifies: ``s`` folds into the value rows of ``qkv`` (attention is linear in V).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from miaotui.compress.quant.qtensor import QuantizedWeight, quantize_rtn
from miaotui.models.bert import BertEncoder

PARAMS = {"rtn": {"bits", "group_size", "symmetric"}, "smoothquant": {"alpha", "weight_bits"}}
CALIB_TEXTS = 256  # default number of --calib lines used


def encoder_linears(model: BertEncoder) -> dict[str, nn.Linear]:
    """Every float linear of the layer stack, by qualified name (pooler and heads stay float)."""
    out = {}
    for i, layer in enumerate(model.layers):
        for name in ("attention.qkv", "attention.query", "attention.key", "attention.value", "attention.out",
                     "intermediate", "output"):
            try:
                m = layer.get_submodule(name)
            except AttributeError:
                continue
            # any float linear: plain, or swapped by prepare_encoder for native few-row kernels / bf16 upcast
            if isinstance(m, nn.Linear) and m.out_features > 0:
                out[f"layers.{i}.{name}"] = m
    return out


def symmetric_int8(w: torch.Tensor, levels: int = 127) -> QuantizedWeight:
    """Per-output-channel symmetric codes within ±``levels`` (63: 7-bit codes in int8 storage)."""
    w = w.detach().float()
    scale = (w.abs().amax(1, keepdim=True) / levels).clamp(min=1e-12)
    q = torch.round(w / scale).clamp(-levels, levels).to(torch.int16)
    return QuantizedWeight(q, scale, None, 8, w.shape[1])


def calibration_texts(ctx) -> list[str]:
    """Lines of ``--calib FILE`` (up to ``--calib-samples``, default 256), else the data-free seed prompts."""
    from miaotui.compress.calib import SEED_PROMPTS
    from miaotui.compress.recipe import RecipeError

    c = ctx.calibration
    if c.file is None:
        return [p if isinstance(p, str) else p[-1]["content"] for p in SEED_PROMPTS]
    path = Path(c.file).expanduser()
    if not path.is_file():
        raise RecipeError(f"--calib {path}: no such file")
    from miaotui.encoder.io import read_texts

    texts = read_texts(path)[: c.samples or CALIB_TEXTS]
    if not texts:
        raise RecipeError(f"--calib {path}: no text in it")
    return texts


@torch.no_grad()
def smooth_attention_out(encoder, texts: list[str], alpha: float = 0.5) -> int:
    """Fold SmoothQuant scales into each layer's value rows / output-projection columns (same function);
    returns how many layers were smoothed. ``encoder``: an ``Encoder`` over the model being compressed."""
    from miaotui.compress.quant.smoothquant import smooth_scale
    from miaotui.encoder.api import TruncationWarning

    model: BertEncoder = encoder.model
    act_max: dict[int, torch.Tensor] = {}

    def hook(i):
        def fn(module, args):
            m = args[0].detach().float().abs().amax(0)
            act_max[i] = torch.maximum(act_max[i], m) if i in act_max else m
        return fn

    layers = [(i, layer.attention) for i, layer in enumerate(model.layers)
              if isinstance(layer.attention.qkv, nn.Linear) and isinstance(layer.attention.out, nn.Linear)
              and layer.attention.out.in_features > 0]
    handles = [attn.out.register_forward_pre_hook(hook(i)) for i, attn in layers]
    try:
        with warnings.catch_warnings():  # long calibration paragraphs are cut to the limit: expected
            warnings.simplefilter("ignore", TruncationWarning)
            encoder.encode(texts, batch_size=32)
    finally:
        for h in handles:
            h.remove()
    for i, attn in layers:
        width = attn.out.in_features
        s = smooth_scale(act_max[i], [attn.out.weight], alpha)
        rows = slice(2 * width, 3 * width)  # v in the fused q|k|v
        attn.qkv.weight[rows] /= s[:, None]
        if attn.qkv.bias is not None:
            attn.qkv.bias[rows] /= s
        attn.out.weight.mul_(s[None, :])
    return len(layers)


def _check(method: str, p: dict[str, Any]):
    from miaotui.compress.recipe import RecipeError

    if method not in PARAMS:
        raise RecipeError(f"quantize: method {method!r} is not available for encoders (choose from "
                          f"{', '.join(PARAMS)}; GPTQ/AWQ calibrate on decoder token windows)")
    unknown = set(p) - PARAMS[method]
    if unknown:
        raise RecipeError(f"quantize/{method}: unknown parameter(s) {', '.join(sorted(unknown))} for an encoder "
                          f"(allowed: {', '.join(sorted(PARAMS[method]))})")
    if method == "rtn":
        bits = p.get("bits", 8)
        if bits not in (4, 8):
            raise RecipeError(f"quantize/rtn: bits must be 4 or 8, got {bits!r}")
        if bits == 8 and (p.get("group_size") not in (None, -1) or p.get("symmetric", True) is not True):
            raise RecipeError("quantize/rtn: group_size must be null and symmetric true with bits 8 "
                              "(int8 runs per output channel, symmetric)")
    else:
        alpha = p.get("alpha", 0.5)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise RecipeError(f"quantize/smoothquant: alpha must be a number in [0, 1], got {alpha!r}")
        if p.get("weight_bits", 7) not in (7, 8):
            raise RecipeError(f"quantize/smoothquant: weight_bits must be 7 or 8, got {p['weight_bits']!r}")


def _kept_float(linears: dict[str, nn.Linear], overrides: Any) -> dict[str, nn.Linear]:
    """``linears`` less those an ``overrides`` glob keeps float (``{"layers.3.*": {skip: true}}``: the only
    per-module setting encoders take, so a search can leave its most sensitive layers unquantized)."""
    from miaotui.compress.quant.mixed import module_settings, unmatched
    from miaotui.compress.recipe import RecipeError

    if overrides is None:
        return linears
    if not isinstance(overrides, dict) or not overrides:
        raise RecipeError("quantize: overrides must be a non-empty mapping of module-name glob → {skip: true}")
    for glob, settings in overrides.items():
        if not isinstance(settings, dict) or set(settings) != {"skip"} or settings["skip"] is not True:
            raise RecipeError(f"quantize: overrides[{glob!r}]: an encoder takes only {{skip: true}} per module "
                              f"(keep it float), got {settings!r}")
    missing = unmatched(overrides, linears)
    if missing:
        raise RecipeError(f"quantize: overrides glob(s) {', '.join(map(repr, missing))} match no encoder linear "
                          f"(names look like {next(iter(linears), '?')!r})")
    return {n: m for n, m in linears.items() if module_settings(n, {}, overrides) is not None}


def run_quantize_encoder(ctx, params: dict[str, Any]) -> dict[str, Any]:
    """The ``quantize`` step on ``ctx.loaded`` (a ``LoadedEncoder``): swaps the layer linears in place and
    records their specs in ``ctx.modules``."""
    from miaotui.compress.quant.swap import swap_linears
    from miaotui.compress.recipe import RecipeError

    p = dict(params)
    method = p.pop("method", "rtn")
    overrides = p.pop("overrides", None)
    head = p.pop("head", None)
    if head not in (None, "none"):
        raise RecipeError(f"quantize: head {head!r} does not apply to an encoder (pooler, masked-LM and "
                          "classifier heads stay float)")
    _check(method, p)
    model: BertEncoder = ctx.loaded.model
    linears = _kept_float(encoder_linears(model), overrides)
    record: dict[str, Any] = {"method": method}
    if method == "smoothquant":
        from miaotui.encoder.api import Encoder

        texts = calibration_texts(ctx)
        record["smoothed_layers"] = smooth_attention_out(Encoder(ctx.loaded), texts, p.get("alpha", 0.5))
        record["calibration_texts"] = len(texts)
        levels = 63 if p.get("weight_bits", 7) == 7 else 127
        qweights = {n: symmetric_int8(m.weight, levels) for n, m in linears.items()}
        record["weight_code_range"] = levels
    else:
        bits, group = p.get("bits", 8), p.get("group_size", 128 if p.get("bits", 8) == 4 else None)
        symmetric = p.get("symmetric", bits == 8)
        qweights = {n: quantize_rtn(m.weight.detach(), bits, group, symmetric) for n, m in linears.items()}
    if not qweights:
        raise RecipeError("quantize: the encoder has no float layer linears left to quantize")
    spec = swap_linears(model, qweights, w8a8=method == "smoothquant")
    ctx.modules.update(spec)
    record["modules"] = len(spec)
    record["group_sizes_used"] = sorted({s["group_size"] for s in spec.values() if s.get("group_size")})
    return record
