"""Sharding quantized linears: unpack to a ``QuantizedWeight`` (codes, scale, zero), slice, re-pack.

Packed codes (two int4 per byte, kernel layouts) cannot be sliced safely, so a shard is cut from the codes
and packed again by the quantized linear's own ``from_quantized``. Column slices (row-parallel layers) must
fall on quantization-group boundaries; a per-channel scale (one group per row) serves every column slice.
"""

from __future__ import annotations

import torch
from torch import nn

from miaotui.compress.quant.qtensor import QuantizedWeight
from miaotui.parallel.tp import TPError


def shard_qweight(qw: QuantizedWeight, rows: list[slice] | None = None, cols: slice | None = None,
                  pad_rows_to: int | None = None) -> QuantizedWeight:
    """The part of ``qw`` with output ``rows`` (concatenated) and input ``cols``; dequantizing it equals
    slicing the dequantized weight. ``pad_rows_to`` appends rows that dequantize to zero."""
    q, scale, zero, g = qw.q, qw.scale, qw.zero, qw.group_size
    if rows is not None:
        q = torch.cat([q[r] for r in rows])
        scale = torch.cat([scale[r] for r in rows])
        zero = torch.cat([zero[r] for r in rows]) if zero is not None else None
    if cols is not None:
        width = cols.stop - cols.start
        if g == qw.q.shape[1]:  # per channel: the row's one scale serves every slice of it
            g = width
        elif cols.start % g or width % g:
            raise TPError(f"a per-rank input width of {width} is not a multiple of the quantization group "
                          f"size {g}: quantize with a group size that divides it")
        else:
            scale = scale[:, cols.start // g:cols.stop // g]
            zero = zero[:, cols.start // g:cols.stop // g] if zero is not None else None
        q = q[:, cols]
    if pad_rows_to is not None and pad_rows_to > q.shape[0]:
        extra = pad_rows_to - q.shape[0]
        # code 0, zero point 0, scale 1: the padding rows dequantize to exactly zero
        q = torch.cat([q, q.new_zeros(extra, q.shape[1])])
        scale = torch.cat([scale, scale.new_ones(extra, scale.shape[1])])
        zero = torch.cat([zero, zero.new_zeros(extra, zero.shape[1])]) if zero is not None else None
    clone = lambda t: t.contiguous().clone() if t is not None else None  # noqa: E731 (free the full tensors)
    return QuantizedWeight(q=clone(q), scale=clone(scale), zero=clone(zero), bits=qw.bits, group_size=g)


def quantized_weight(module: nn.Module) -> QuantizedWeight:
    """The unpacked weight of a quantized linear from ``compress/quant/qlinear.py``."""
    from miaotui.compress.quant.qlinear import Int4Linear, Int8Linear, W8A8Linear

    if isinstance(module, Int4Linear):  # asymmetric storage (symmetric codes are kept with zero = 8)
        return QuantizedWeight(module.codes().to(torch.int16), module.scale.float(), module.zero.float(), 4,
                               module.group_size)
    if isinstance(module, (Int8Linear, W8A8Linear)):  # symmetric, per output channel or (int8) per group
        scale = module.scale if module.scale.dim() == 2 else module.scale[:, None]
        group = getattr(module, "group_size", module.in_features)
        return QuantizedWeight(module.qweight.to(torch.int16), scale, None, 8, group)
    raise TPError(f"cannot shard a {type(module).__name__}: tensor parallel supports nn.Linear and the "
                  "quantized linears of compress/quant/qlinear.py")


def take_quantized(module: nn.Module, rows: list[slice] | None, cols: slice | None, bias: bool,
                   pad_rows_to: int | None = None) -> nn.Module:
    """A shard of a quantized linear, re-packed by its own class. ``prepare()`` (kernel buffers, measured
    per shape) runs again when the original had been prepared; otherwise ``prepare_for_inference`` does it."""
    b = getattr(module, "bias", None) if bias else None
    if b is not None and rows is not None:
        b = torch.cat([b[r] for r in rows])
    qw = shard_qweight(quantized_weight(module), rows, cols, pad_rows_to)
    if b is not None and pad_rows_to is not None and pad_rows_to > b.shape[0]:
        b = torch.cat([b, b.new_zeros(pad_rows_to - b.shape[0])])
    new = type(module).from_quantized(qw, bias=None if b is None else b.detach().clone())
    if getattr(module, "packed_rows", 0) or getattr(module, "use_int_mm", False):
        new.prepare()
    return new
