"""Run calibration tokens through a decoder one layer at a time and collect what the quantizers need.

    stack = layer_stack(model)                       # embed, per-layer call, linears, foldable scale groups
    for i, layer, calib in layer_by_layer(model, ids):
        stats = calib.capture({"mlp.down_proj": HessianStat(1536)})   # one pass through this layer
        ...quantize this layer's linears...
        calib.advance(qweights)                      # next layer sees this layer's *quantized* outputs

Sequential like the GPTQ paper: layer i's statistics come from inputs that already carry the quantization
error of layers < i, so each layer compensates for what came before it. Each layer is called directly
(no KV cache: ``start = 0``, full causal attention over the window).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from miaotui.compress.quant.qtensor import QuantizedWeight
from miaotui.errors import MiaotuiError
from miaotui.models.base import dense_linears


@dataclass
class ScaleGroup:
    """Linears reading one input, and the op just before them that absorbs a per-input-channel scale.

    Dividing the input of ``linears`` by ``s`` (in ``prev``) and multiplying their weight columns by ``s``
    leaves the function unchanged; AWQ and SmoothQuant choose ``s``. ``prev`` is a norm (weight and bias
    divided by s) or a Linear whose output rows ``prev_rows`` are the input (v → o, up → down).
    ``heads = (group, head_dim)`` when one ``prev`` row feeds ``group`` input channels (GQA: a kv head's v
    serves ``group`` query heads), so a scale per ``prev`` row is repeated over them.
    """

    name: str
    prev: nn.Module
    linears: list[str]
    prev_rows: slice | None = None
    heads: tuple[int, int] | None = None

    def expand(self, s: torch.Tensor) -> torch.Tensor:
        """Per-prev-row scale → per-input-channel scale of ``linears``."""
        if self.heads is None:
            return s
        group, d = self.heads
        return s.view(-1, 1, d).expand(-1, group, d).reshape(-1)

    def reduce(self, stat: torch.Tensor) -> torch.Tensor:
        """Per-input-channel statistic → per-prev-row (mean over the channels sharing a row)."""
        if self.heads is None:
            return stat
        group, d = self.heads
        return stat.view(-1, group, d).mean(1).reshape(-1)


@torch.no_grad()
def fold_scale(group: ScaleGroup, s: torch.Tensor, linears: dict[str, nn.Linear]) -> None:
    """Divide ``prev``'s output by ``s`` and multiply the linears' input columns by it: same function."""
    prev = group.prev
    if isinstance(prev, nn.Linear):
        rows = group.prev_rows or slice(None)
        prev.weight[rows] /= s[:, None]
        if prev.bias is not None:
            prev.bias[rows] /= s
    else:  # RMSNorm / LayerNorm: y = weight * norm(x) (+ bias)
        prev.weight /= s
        if getattr(prev, "bias", None) is not None:
            prev.bias /= s
    full = group.expand(s)
    for name in group.linears:
        linears[name].weight.mul_(full[None, :])


class LayerStack:
    """What the layer-wise loop needs from one architecture: embeddings, a direct layer call, the scale groups."""

    def __init__(self, model: nn.Module):
        from miaotui.models.gpt2 import GPT2LMHeadModel
        from miaotui.models.llama import LlamaForCausalLM

        self.model = model
        if isinstance(model, LlamaForCausalLM):
            self.arch, self.layers, self.prefix = "llama", model.model.layers, "model.layers"
            for blk in self.layers:  # the scale groups below name the fused projections
                if blk.self_attn.qkv_proj is None or blk.mlp.gate_up_proj is None:
                    if not all(isinstance(getattr(m, n, None), nn.Linear) for m, n in [
                            (blk.self_attn, "q_proj"), (blk.self_attn, "k_proj"), (blk.self_attn, "v_proj"),
                            (blk.mlp, "gate_proj"), (blk.mlp, "up_proj")]):
                        raise MiaotuiError("layer-wise quantization needs float nn.Linear projections")
                    blk.self_attn.fuse()
                    blk.mlp.fuse()
        elif isinstance(model, GPT2LMHeadModel):
            self.arch, self.layers, self.prefix = "gpt2", model.transformer.h, "transformer.h"
        else:
            raise MiaotuiError(f"layer-wise quantization does not know {type(model).__name__} yet")

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids → (B, T, C) input of layer 0."""
        m = self.model
        if self.arch == "llama":
            return m.model.embed_tokens(ids)
        pos = torch.arange(ids.shape[1], device=ids.device)
        return m.transformer.wte(ids) + m.transformer.wpe(pos)

    def run(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One decoder layer on full sequences from position 0, no cache."""
        if self.arch == "llama":
            t = x.shape[1]
            return layer(x, self.model.rope_cos[:t], self.model.rope_sin[:t], 0)
        return layer(x, 0)

    def linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """Every float linear inside the layer, by name relative to it (the ones the quantizers replace)."""
        return dense_linears(layer)

    def scale_groups(self, layer: nn.Module) -> list[ScaleGroup]:
        """Foldable groups in execution order; a linear in none (GPT-2's mlp.c_proj, after GELU) is not scaled."""
        if self.arch == "llama":
            attn, mlp = layer.self_attn, layer.mlp
            q, k, v = attn.qkv_split
            n_q, n_kv = q // attn.head_dim, k // attn.head_dim
            inter = mlp.down_proj.in_features
            return [
                ScaleGroup("attn_in", layer.input_layernorm, ["self_attn.qkv_proj"]),
                ScaleGroup("v_o", attn.qkv_proj, ["self_attn.o_proj"], slice(q + k, q + k + v),
                           (n_q // n_kv, attn.head_dim) if n_q != n_kv else None),
                ScaleGroup("mlp_in", layer.post_attention_layernorm, ["mlp.gate_up_proj"]),
                ScaleGroup("up_down", mlp.gate_up_proj, ["mlp.down_proj"], slice(inter, 2 * inter)),
            ]
        c = layer.attn.c_proj.in_features
        return [
            ScaleGroup("attn_in", layer.ln_1, ["attn.c_attn"]),
            ScaleGroup("v_o", layer.attn.c_attn, ["attn.c_proj"], slice(2 * c, 3 * c)),
            ScaleGroup("mlp_in", layer.ln_2, ["mlp.c_fc"]),
        ]


def layer_stack(model: nn.Module) -> LayerStack:
    return LayerStack(model)


# ---- statistics of a linear's inputs, accumulated over calibration chunks

class HessianStat:
    """H = 2/N Σ x xᵀ over all N input rows (GPTQ's proxy Hessian of the layer's squared output error)."""

    def __init__(self, dim: int):
        self.h = torch.zeros(dim, dim)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:  # x: (rows, in)
        x = x.float()
        m = x.shape[0]
        # running mean keeps the magnitude O(1) whatever N is
        self.h.mul_(self.n / (self.n + m)).addmm_(x.t(), x, alpha=2.0 / (self.n + m))
        self.n += m


class ChannelStat:
    """Per-input-channel mean |x| and max |x| (AWQ's activation scale, SmoothQuant's outlier measure)."""

    def __init__(self, dim: int):
        self.abs_sum = torch.zeros(dim, dtype=torch.float64)
        self.abs_max = torch.zeros(dim)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        a = x.float().abs()
        self.abs_sum += a.sum(0, dtype=torch.float64)
        self.abs_max = torch.maximum(self.abs_max, a.amax(0))
        self.n += a.shape[0]

    @property
    def abs_mean(self) -> torch.Tensor:
        return (self.abs_sum / max(self.n, 1)).float()


@dataclass
class LayerCalib:
    """One layer's calibration inputs (chunks of hidden states) and how to run them through it."""

    stack: LayerStack
    index: int
    layer: nn.Module
    xs: list[torch.Tensor]
    name_prefix: str
    linears: dict[str, nn.Linear] = field(default_factory=dict)
    advanced: bool = False

    @property
    def num_tokens(self) -> int:
        return sum(x.shape[0] * x.shape[1] for x in self.xs)

    def qualified(self, name: str) -> str:
        return f"{self.name_prefix}.{name}"

    @torch.no_grad()
    def capture(self, stats: dict[str, object]) -> dict[str, object]:
        """One pass of every chunk through the layer, feeding each named linear's inputs (rows, in) to
        its stat's ``add`` (or to each stat of a tuple); returns ``stats``."""
        hooks = [self.linears[name].register_forward_pre_hook(_feeder(stat)) for name, stat in stats.items()]
        try:
            for x in self.xs:
                self.stack.run(self.layer, x)
        finally:
            for h in hooks:
                h.remove()
        return stats

    @torch.no_grad()
    def advance(self, qweights: dict[str, QuantizedWeight] | None = None) -> None:
        """Replace the chunks by this layer's outputs, computed with ``qweights`` (relative names) fake-
        quantized in, then put the float weights back: the model leaves this loop still a float model."""
        saved = {}
        for name, qw in (qweights or {}).items():
            lin = self.linears[name]
            saved[name] = lin.weight.data
            lin.weight.data = qw.dequantize(lin.weight.dtype)
        try:
            self.xs = [self.stack.run(self.layer, x) for x in self.xs]
            self.advanced = True
        finally:
            for name, w in saved.items():
                self.linears[name].weight.data = w


def _feeder(stat) -> Callable:
    stats = stat if isinstance(stat, tuple) else (stat,)

    def hook(module, args):
        x = args[0].reshape(-1, args[0].shape[-1])
        for st in stats:
            st.add(x)
    return hook


@torch.no_grad()
def layer_by_layer(model: nn.Module, ids: torch.Tensor, chunk: int = 8, progress: bool = True,
                   desc: str = "quantize") -> Iterator[LayerCalib]:
    """Yield a ``LayerCalib`` per decoder layer, in order. The caller calls ``advance`` on each with the
    layer's quantized weights (else the float outputs feed the next layer); ids (N, T) run in chunks of
    ``chunk`` sequences to bound activation memory."""
    from tqdm import tqdm

    stack = layer_stack(model)
    model.clear_cache()  # the direct layer calls attend over the window itself, not a stale cache
    xs = [stack.embed(c) for c in ids.split(chunk)]
    for i in tqdm(range(len(stack.layers)), desc=desc, unit="layer", disable=not progress):
        layer = stack.layers[i]
        calib = LayerCalib(stack, i, layer, xs, f"{stack.prefix}.{i}", stack.linears(layer))
        yield calib
        if not calib.advanced:  # the caller changed nothing worth feeding forward: float outputs
            calib.advance()
        xs = calib.xs


def fake_quantize(model: nn.Module, qweights: dict[str, QuantizedWeight]) -> dict[str, torch.Tensor]:
    """Set each named linear's weight to its dequantized value (for evaluation without packed kernels);
    returns the float weights so ``restore`` can put them back."""
    modules = dict(model.named_modules())
    saved = {}
    for name, qw in qweights.items():
        lin = modules[name]
        saved[name] = lin.weight.data
        lin.weight.data = qw.dequantize(lin.weight.dtype)
    return saved


def restore(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    modules = dict(model.named_modules())
    for name, w in saved.items():
        modules[name].weight.data = w
