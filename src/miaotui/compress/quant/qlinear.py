"""Packed quantized linears that drop in for ``nn.Linear``; the model never knows which it holds.

- ``Int8Linear``: weight-only int8, symmetric, per output channel or per group of input columns.
- ``Int4Linear``: weight-only int4, group-wise, asymmetric (symmetric codes are stored with zero = 8).
- ``W8A8Linear``: int8 weights and int8 activations quantized per token at run time (SmoothQuant target).

Buffers named here are the checkpoint format (portable, kernel-independent). ``prepare()`` picks the
fastest packed kernel for this machine (see ``kernels.py``): miaotui's native GEMV kernels read these
buffers as they are; PyTorch's (the fallback) get their own layout built here. It then decides, per shape,
up to how many rows the packed kernel beats dequantize-then-matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from miaotui import kernels as native
from miaotui.compress.quant import kernels
from miaotui.compress.quant.pack import pack_int4, unpack_int4
from miaotui.compress.quant.qtensor import QuantizedWeight

INT4_KERNEL_GROUPS = (256, 128, 64, 32)


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


def _fill_int8(m: "Int8Linear | W8A8Linear", qw: QuantizedWeight, scale: torch.Tensor,
               bias: torch.Tensor | None) -> "Int8Linear | W8A8Linear":
    """``m`` (just built) holding ``qw``'s symmetric int8 codes, ``scale`` and ``bias``."""
    m.qweight.copy_(qw.q.to(torch.int8))
    m.scale.copy_(scale)
    if bias is not None:
        m.bias.data.copy_(bias.float())
    return m


class QuantLinear(nn.Module):
    kind = ""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.packed_rows = 0  # inputs with at most this many rows take the packed kernel
        self.native = False  # the packed kernel is miaotui's native one (else PyTorch's)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self) -> None:
        """Build kernel-specific buffers and measure the kernel crossover (call after loading weights)."""

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantize(x.dtype), bias)

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, " \
               f"packed_rows<={self.packed_rows}{' (native)' if self.native else ''}"


class Int8Linear(QuantLinear):
    """Symmetric int8 weights, ``w = q * scale``: one scale per output channel (``scale`` [out]) or per
    group of ``group_size`` input columns (``scale`` [out, in / group_size]).

    Groups follow the weights' own block structure (GGUF sources are quantized in blocks of 32 columns, so a
    row-wide scale wastes range on the row's widest block); per-channel checkpoints keep their 1-D scale.
    Grouped products run in the native kernel where it loads (``miaotui.kernels.int8_gemv`` takes the 2-D scale),
    else dequantize-then-matmul: PyTorch's ``_weight_int8pack_mm`` takes one scale per row only."""

    kind = "int8"

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int | None = None):
        super().__init__(in_features, out_features, bias)
        group_size = in_features if group_size in (None, -1) else group_size
        if group_size <= 0 or in_features % group_size:
            raise ValueError(f"group size {group_size} must divide in_features {in_features}")
        self.group_size = group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        shape = (out_features, in_features // group_size) if self.grouped else (out_features,)
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("scale_bf16", None if self.grouped else torch.ones(out_features, dtype=torch.bfloat16),
                             persistent=False)

    @property
    def grouped(self) -> bool:
        return self.group_size < self.in_features

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> "Int8Linear":
        if qw.bits != 8 or not qw.symmetric or qw.shape[1] % qw.group_size:
            raise ValueError("Int8Linear takes symmetric 8-bit weights with a group size dividing in_features, "
                             f"got bits={qw.bits}, symmetric={qw.symmetric}, group={qw.group_size}")
        m = cls(qw.shape[1], qw.shape[0], bias is not None, group_size=qw.group_size)
        return _fill_int8(m, qw, qw.scale if m.grouped else qw.scale[:, 0], bias)

    def scale_columns(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The scale as [out, groups] (groups = 1 per channel): what multiplies ``qweight`` viewed by group."""
        s = self.scale.to(dtype)
        return s if self.grouped else s.unsqueeze(1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = self.qweight.view(self.out_features, -1, self.group_size).to(dtype)
        return (q * self.scale_columns(dtype).unsqueeze(-1)).view(self.out_features, self.in_features)

    def dequantize_rows(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows ``ids`` of the dequantized weight (an embedding lookup into a tied int8 head): [*ids, in]."""
        q = F.embedding(ids, self.qweight).to(dtype).view(*ids.shape, -1, self.group_size)
        s = F.embedding(ids, self.scale_columns(dtype))  # [*ids, groups]
        return (q * s.unsqueeze(-1)).view(*ids.shape, self.in_features)

    def prepare(self) -> None:
        self.packed_rows, self.native = 0, False
        if self.grouped:
            self._prepare_grouped()
            return
        self.scale_bf16 = self.scale.to(torch.bfloat16)
        torch_ok = kernels.int8pack_supported() and self.qweight.device.type == "cpu"
        if kernels.native_supported(self.qweight):
            # where PyTorch's kernel is fast too (AVX-512 builds), the faster of the two on one row decides
            self.native = not torch_ok or kernels.native_faster(
                ("int8-native-vs-torch", self.out_features, self.in_features), self._native_mm,
                self._torch_mm, self.in_features)
        if self.native:
            key = ("int8-native", self.out_features, self.in_features)
            self.packed_rows = kernels.packed_rows_limit(key, self._packed, self._dense, self.in_features,
                                                         assume=kernels.NATIVE_ASSUMED_ROWS)
        elif torch_ok:
            key = ("int8", self.out_features, self.in_features)
            self.packed_rows = kernels.packed_rows_limit(key, self._packed, self._dense, self.in_features)

    def _prepare_grouped(self) -> None:
        # only the native kernel takes group scales; without it every input is dequantize-then-matmul
        if self.group_size % native.INT8_GROUP_MULTIPLE == 0 and kernels.native_supported(self.qweight):
            self.native = True
            key = ("int8-native", self.out_features, self.in_features, self.group_size)
            self.packed_rows = kernels.packed_rows_limit(key, self._packed, self._dense, self.in_features,
                                                         assume=kernels.NATIVE_ASSUMED_ROWS)

    def _native_mm(self, x: torch.Tensor) -> torch.Tensor:
        return native.int8_gemv(x, self.qweight, self.scale, self.bias)

    def _torch_mm(self, x: torch.Tensor) -> torch.Tensor:
        # PyTorch's kernel is only fast with bf16 activations on CPU; scales ride along in bf16
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16),
                                               self.qweight, self.scale_bf16)
        return self._add_bias(y.to(x.dtype).reshape(*x.shape[:-1], self.out_features))

    def _packed(self, x: torch.Tensor) -> torch.Tensor:
        return self._native_mm(x) if self.native else self._torch_mm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._packed(x) if _rows(x) <= self.packed_rows else self._dense(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", group={self.group_size}" if self.grouped else "")


class Int4Linear(QuantLinear):
    kind = "int4"

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False):
        super().__init__(in_features, out_features, bias)
        if in_features % group_size or in_features % 2:
            raise ValueError(f"group size {group_size} must divide in_features {in_features} (even)")
        self.group_size = group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        # fp16, like llama.cpp's Q4 formats: a scale and a zero per 32 weights cost 0.125 bytes per weight
        # instead of 0.25, which decode streams on every token (quality: KLD changes in the 4th digit)
        self.register_buffer("scale", torch.ones(out_features, groups, dtype=torch.float16))
        self.register_buffer("zero", torch.full((out_features, groups), 8.0, dtype=torch.float16))
        self.kernel_group = 0
        self.register_buffer("kernel_weight", None, persistent=False)
        self.register_buffer("kernel_scale_zero", None, persistent=False)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> "Int4Linear":
        if qw.bits != 4:
            raise ValueError("Int4Linear takes 4-bit weights")
        m = cls(qw.shape[1], qw.shape[0], qw.group_size, bias is not None)
        q, zero = (qw.q + 8, torch.full_like(qw.scale, 8.0)) if qw.symmetric else (qw.q, qw.zero)
        m.qweight.copy_(pack_int4(q))
        m.scale.copy_(qw.scale)
        m.zero.copy_(zero)
        if bias is not None:
            m.bias.data.copy_(bias.float())
        return m

    def codes(self) -> torch.Tensor:
        return unpack_int4(self.qweight)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = self.codes().view(self.out_features, -1, self.group_size).to(dtype)
        w = (q - self.zero.to(dtype).unsqueeze(-1)) * self.scale.to(dtype).unsqueeze(-1)
        return w.view(self.out_features, self.in_features)

    def prepare(self) -> None:
        self.kernel_weight = self.kernel_scale_zero = None
        self.packed_rows, self.native = 0, False
        if self.scale.dtype != torch.float16:  # checkpoints written before fp16 scales: one format in memory
            self.scale, self.zero = self.scale.half(), self.zero.half()
        native_ok = self.group_size % native.INT4_GROUP_MULTIPLE == 0 and kernels.native_supported(self.qweight)
        torch_ok = self._build_torch_layout()
        if native_ok:
            # where PyTorch's kernel is fast too (AVX-512 builds), the faster of the two on one row decides;
            # the native kernel reads qweight/scale/zero as stored, so PyTorch's copy is then dropped
            self.native = not torch_ok or kernels.native_faster(
                ("int4-native-vs-torch", self.out_features, self.in_features, self.group_size),
                self._native_mm, self._torch_mm, self.in_features)
        if self.native:
            self.kernel_weight = self.kernel_scale_zero = None
            # measured from 2 rows: with several rows the int4 kernel turns compute-bound (AVX2: 4 rows
            # cost about 2.4x one row), so its crossover with dequantize-then-matmul is shape-dependent
            key = ("int4-native", self.out_features, self.in_features, self.group_size)
            self.packed_rows = kernels.packed_rows_limit(key, self._packed, self._dense, self.in_features,
                                                         assume=1)
        elif torch_ok:
            key = ("int4", self.out_features, self.in_features, self.kernel_group)
            self.packed_rows = kernels.packed_rows_limit(key, self._packed, self._dense, self.in_features)

    def _build_torch_layout(self) -> bool:
        """PyTorch's int4 CPU kernel layout (a second copy of the codes); False where it cannot run."""
        # it wants N % 16 == 0 and a group of 32..256; a larger group (per-channel) is the same math with its
        # scale repeated over smaller kernel groups
        if not (kernels.int4pack_supported() and self.qweight.device.type == "cpu" and self.out_features % 16 == 0):
            return False
        group = next((g for g in INT4_KERNEL_GROUPS if g <= self.group_size and self.group_size % g == 0
                      and self.in_features % g == 0), 0)
        if not group:
            return False
        reps = self.group_size // group
        scale = self.scale.float().repeat_interleave(reps, dim=1)
        zero_fp = (8.0 - self.zero.float().repeat_interleave(reps, dim=1)) * scale  # kernel: (q - 8) * s + z_fp
        self.kernel_group = group
        self.kernel_weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.codes().to(torch.int32), 1)
        self.kernel_scale_zero = torch.stack([scale.t(), zero_fp.t()], dim=-1).contiguous().to(torch.bfloat16)
        return True

    def _native_mm(self, x: torch.Tensor) -> torch.Tensor:
        return native.int4_gemv(x, self.qweight, self.scale, self.zero, self.group_size, self.bias)

    def _torch_mm(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).to(torch.bfloat16),
                                                       self.kernel_weight, self.kernel_group,
                                                       self.kernel_scale_zero)
        return self._add_bias(y.to(x.dtype).reshape(*x.shape[:-1], self.out_features))

    def _packed(self, x: torch.Tensor) -> torch.Tensor:
        return self._native_mm(x) if self.native else self._torch_mm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._packed(x) if _rows(x) <= self.packed_rows else self._dense(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group={self.group_size}"


class W8A8Linear(QuantLinear):
    """y = (round(x / s_x) @ Wq^T) * s_x * s_w with s_x = max|x| / 127 per token (dynamic)."""

    kind = "w8a8"

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.use_int_mm = False
        self.use_fbgemm = False
        self._fbgemm_weight = None  # fbgemm's packed weight (not a tensor: never saved)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> "W8A8Linear":
        # the integer product applies one weight scale per output row after the sum: no groups
        if qw.bits != 8 or not qw.symmetric or qw.group_size != qw.shape[1]:
            raise ValueError("W8A8Linear takes symmetric per-channel 8-bit weights")
        return _fill_int8(cls(qw.shape[1], qw.shape[0], bias is not None), qw, qw.scale[:, 0], bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.qweight.to(dtype) * self.scale.to(dtype).unsqueeze(1)

    def prepare(self) -> None:
        # torch._int_mm only pays off with VNNI/AMX int8 dot products; otherwise the same integer math runs
        # in fp32 (exact while a dot product stays below 2^24, within fp32 rounding beyond): for a few rows
        # in the native int8 GEMV, which reads the int8 weights instead of converting them all first
        self.native = kernels.native_supported(self.qweight)
        self.packed_rows = kernels.NATIVE_ASSUMED_ROWS if self.native else 0
        key = ("w8a8", self.out_features, self.in_features)
        self.use_int_mm = self.qweight.device.type == "cpu" and kernels.faster_at(
            key, lambda x: self._int_forward(x, True), lambda x: self._int_forward(x, False),
            self.in_features, rows=64)
        self.use_fbgemm = False
        if self._pack_fbgemm():
            reference = lambda x: self._int_forward(x, self.use_int_mm)  # noqa: E731
            self.use_fbgemm = kernels.faster_at(key + ("fbgemm", self.use_int_mm), self._fbgemm_forward, reference,
                                                self.in_features, rows=256)

    def _pack_fbgemm(self) -> bool:
        """FBGEMM's u8 x s8 AVX2 kernel (``vpmaddubsw``) adds pairs of products in int16, which saturates
        unless 2 * 255 * max|w| < 2^15: exact only for weight codes within ±63 (what encoder/quantize.py
        stores). Activation codes ride as u8 with zero point 128, one scale per token applied after."""
        self._fbgemm_weight = None
        if (self.qweight.device.type != "cpu" or not kernels.fbgemm_linear_supported()
                or int(self.qweight.abs().max()) > 63):
            return False
        import warnings

        with warnings.catch_warnings():  # quantized-tensor constructors are deprecated, the fbgemm ops are not
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(self.qweight, self.scale.double(),
                                                          torch.zeros(self.out_features, dtype=torch.long), 0)
            self._fbgemm_weight = torch.ops.quantized.linear_prepack(qw, None)
        return True

    def _fbgemm_forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()
        sx = self.activation_scale(x2)
        # quantized with scale 1 and zero point 128: the codes are round(x / s_x) + 128, as _int_forward's
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x2 / sx, 1.0, 128, self._fbgemm_weight)
        y.mul_(sx)  # scale and bias in place: no fresh output-sized tensors (each one is page-faulted in)
        if self.bias is not None:
            y.add_(self.bias.to(y.dtype))
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    @staticmethod
    def activation_scale(x: torch.Tensor) -> torch.Tensor:
        """max|x| / 127 per row, as fp32 (rows, 1). max(max x, -min x): two reductions without the temporary
        of abs(), measured 0.27 vs 3.4 ms (4800 x 384) and 2.0 vs 3.4 ms (4800 x 1536) at 2 threads;
        linalg.vector_norm(inf) took 3.8 and 12.5 ms."""
        amax = torch.maximum(x.amax(-1, keepdim=True), x.amin(-1, keepdim=True).neg_())
        return amax.float().clamp_(min=1e-8).div_(127.0)

    @classmethod
    def quantize_activations(cls, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = cls.activation_scale(x)
        return torch.round(x.float() / scale).clamp(-127, 127), scale

    def _int_forward(self, x: torch.Tensor, int_mm: bool) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        xq, sx = self.quantize_activations(x2)
        if _rows(x2) <= self.packed_rows:  # native GEMV: the same integer products, summed in fp32
            y = native.int8_gemv(xq, self.qweight, self.scale) * sx
            return self._add_bias(y.to(x.dtype).reshape(*x.shape[:-1], self.out_features))
        if int_mm:
            acc = torch._int_mm(xq.to(torch.int8), self.qweight.t()).float()
        else:
            acc = F.linear(xq, self.qweight.float())
        y = acc * sx * self.scale
        return self._add_bias(y.to(x.dtype).reshape(*x.shape[:-1], self.out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_fbgemm:
            return self._fbgemm_forward(x)
        return self._int_forward(x, self.use_int_mm)


def prepare_quantized(model: nn.Module) -> int:
    """Call ``prepare()`` on every quantized linear; returns how many there are."""
    n = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.prepare()
            n += 1
    return n
