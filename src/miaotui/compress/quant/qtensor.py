"""``QuantizedWeight``: the one hand-off between quantization algorithms and the runtime linears.

Codes are stored unpacked (one integer per weight, ``[out, in]``) so every algorithm (RTN, GPTQ, AWQ) writes
the same thing; ``qlinear`` packs them for its kernel. Groups run along the input dimension; a group size
equal to ``in_features`` means per output channel.

    w ≈ (q - zero) * scale         asymmetric (zero in code units per group: an integer code, so 0 is
                                   exact; or, with ``float_zero``, a float, so q = 0 is exactly the group's
                                   minimum, as in GGUF's Q4_1 "d * q + min")
    w ≈ q * scale                  symmetric  (zero is None; q is signed)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    q: torch.Tensor            # int16 codes [out, in]: [0, 2^bits - 1] (asymmetric) or [-2^(b-1)+1, 2^(b-1)-1]
    scale: torch.Tensor        # float32 [out, in // group_size] (4 bits: fp16 values, see group_params)
    zero: torch.Tensor | None  # float32 [out, in // group_size], None when symmetric
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out, inp = self.q.shape
        q = self.q.float().view(out, inp // self.group_size, self.group_size)
        if self.zero is not None:
            q = q - self.zero.unsqueeze(-1)
        return (q * self.scale.unsqueeze(-1)).view(out, inp).to(dtype)


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    if symmetric:
        return -(2 ** (bits - 1)) + 1, 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def check_group(in_features: int, group_size: int | None) -> int:
    """Group size along the input dim; None or -1 means one group per output channel.

    A group that does not divide ``in_features`` (128 on SmolLM2's 576-wide layers) becomes the largest
    divisor below it, preferring multiples of 32 (kernel-friendly): 576 with 128 → 96. The group actually
    used is recorded in the ``QuantizedWeight`` and the checkpoint."""
    if group_size is None or group_size <= 0 or group_size >= in_features:
        return in_features
    if in_features % group_size == 0:
        return group_size
    divisors = [g for g in range(group_size, 0, -1) if in_features % g == 0]
    return next((g for g in divisors if g % 32 == 0), divisors[0])


def group_params(w: torch.Tensor, bits: int, symmetric: bool, float_zero: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero) for rows of ``w`` ([..., g]) from their min/max: the grid RTN and GPTQ both use.

    Default: 0 in every group's range and an integer zero point (0 stays exact). ``float_zero``: codes span
    exactly [min, max] with a float zero point. Measured on SmolLM2 (docs/BENCHMARKS.md): float_zero re-finds
    its Q4_1 weights losslessly at group 32, but at group 96/128 it has lower weight MSE yet worse
    perplexity and KLD than the integer grid, so it is an option, not the default.

    4 bits: scales and zeros are fp16 values (``Int4Linear`` stores them in fp16), chosen before the codes so
    every algorithm rounds onto the grid that runs. A float zero point keeps fp16's 11 significant bits
    (within 2^-8 of a code below 16): the Q4_1 re-find is then KLD 0.00092 instead of 0.00091 on SmolLM2."""
    w = w.float()
    qmin, qmax = qrange(bits, symmetric)
    fp16 = bits == 4
    smallest = FP16_SMALLEST_SCALE if fp16 else 1e-8
    if symmetric:
        scale = (w.abs().amax(-1) / qmax).clamp(min=smallest)
        return (_fp16(scale, up=True) if fp16 else scale), None
    if float_zero:  # nearest: an fp16 Q4_1 scale is found exactly (its grid spans [min, max] either way)
        lo, hi = w.amin(-1), w.amax(-1)
        scale = ((hi - lo) / qmax).clamp(min=smallest)
        scale = _fp16(scale) if fp16 else scale
        return scale, (_fp16(-lo / scale) if fp16 else -lo / scale)
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    scale = ((hi - lo) / qmax).clamp(min=smallest)
    scale = _fp16(scale, up=True) if fp16 else scale
    return scale, torch.round(-lo / scale).clamp(qmin, qmax)


FP16_SMALLEST_SCALE = 2.0 ** -14  # fp16's smallest normal: a smaller scale would lose its own precision


def _fp16(t: torch.Tensor, up: bool = False) -> torch.Tensor:
    """fp16 values (kept in fp32): the nearest, or with ``up`` the nearest not below ``t`` (the grid still
    reaches the group's extremes, so every weight stays within half a step)."""
    h = t.half()
    if up:
        h = torch.where(h.float() < t, torch.nextafter(h, torch.full_like(h, float("inf"))), h)
    return h.float()


def quantize_with(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Round ``w`` ([..., g]) onto a given grid (scale/zero broadcast over the last dim): integer codes."""
    qmin, qmax = qrange(bits, zero is None)
    q = w.float() / scale.unsqueeze(-1)
    if zero is not None:
        q = q + zero.unsqueeze(-1)
    return torch.round(q).clamp(qmin, qmax)


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = False,
                 float_zero: bool = False) -> QuantizedWeight:
    """Round-to-nearest on a min/max grid per group: the baseline every other method must beat."""
    out, inp = w.shape
    g = check_group(inp, group_size)
    wg = w.detach().float().reshape(out, inp // g, g)
    scale, zero = group_params(wg, bits, symmetric, float_zero)
    q = quantize_with(wg, scale, zero, bits).reshape(out, inp).to(torch.int16)
    return QuantizedWeight(q=q, scale=scale, zero=zero, bits=bits, group_size=g)
