"""Packed quantized linears: each equals its dequantized reference matmul; packing round-trips."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from miaotui.compress.quant.pack import pack_int4, unpack_int4
from miaotui.compress.quant.qlinear import Int4Linear, Int8Linear, W8A8Linear
from miaotui.compress.quant.qtensor import QuantizedWeight, check_group, quantize_rtn


def test_int4_pack_roundtrip():
    q = torch.randint(0, 16, (48, 96))
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (48, 48)
    assert torch.equal(unpack_int4(packed).long(), q)
    with pytest.raises(ValueError):
        pack_int4(torch.full((2, 4), 16))


def test_check_group_falls_back_to_a_divisor():
    assert check_group(576, 128) == 96  # SmolLM2's hidden size: the largest multiple of 32 dividing it
    assert check_group(1536, 128) == 128
    assert check_group(100, 64) == 50  # no multiple of 32 divides: the largest divisor
    assert check_group(576, None) == 576 and check_group(576, -1) == 576


@pytest.mark.parametrize("bits,group,sym", [(8, None, True), (4, 32, False), (4, None, False), (4, 32, True)])
def test_rtn_error_within_half_a_step(bits, group, sym):
    w = torch.randn(32, 128)
    qw = quantize_rtn(w, bits, group, sym)
    step = qw.scale.repeat_interleave(qw.group_size, dim=1)
    assert ((qw.dequantize() - w).abs() <= step / 2 + 1e-6).all()


def _reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.double(), w.double(), None if bias is None else bias.double())


@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_matches_dequantized(rows, bias):
    torch.manual_seed(rows)
    w, b = torch.randn(64, 96), torch.randn(64) if bias else None
    m = Int8Linear.from_quantized(quantize_rtn(w, 8, None, True), b)
    m.prepare()
    x = torch.randn(rows, 96)
    y = m(x)
    if rows <= m.packed_rows and not m.native:  # PyTorch's packed kernel: bf16 activations and scales
        ref = _reference(x.bfloat16().float(), m.qweight.float() * m.scale_bf16.float()[:, None], b)
        tol = 2e-2
    else:  # the native kernel rounds activations to int16 per block of 32 (< 2^-15 of the block's max)
        ref, tol = _reference(x, m.dequantize(), b), 1e-4
    torch.testing.assert_close(y.double(), ref, atol=tol * ref.abs().max().item(), rtol=tol)
    torch.testing.assert_close(m._dense(x).double(), _reference(x, m.dequantize(), b), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 2, 48])
def test_int4_linear_matches_dequantized(group, rows):
    torch.manual_seed(group + rows)
    w = torch.randn(48, 128)
    qw = quantize_rtn(w, 4, group, symmetric=False)
    m = Int4Linear.from_quantized(qw, None)
    torch.testing.assert_close(m.dequantize(), qw.dequantize())  # packing loses nothing
    m.prepare()
    x = torch.randn(rows, 128)
    ref = _reference(x, qw.dequantize(), None)
    if m.kernel_weight is not None:  # the packed kernel itself, whatever the measured crossover
        # bf16 activations, scales and zero points: compare within their rounding
        torch.testing.assert_close(m._packed(x).double(), ref, atol=0.05 * ref.abs().max().item(), rtol=0.02)
    torch.testing.assert_close(m._dense(x).double(), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(m(x).double(), ref, atol=0.05 * ref.abs().max().item(), rtol=0.02)


def test_int4_symmetric_codes_are_shifted():
    w = torch.randn(16, 64)
    qw = quantize_rtn(w, 4, 32, symmetric=True)
    m = Int4Linear.from_quantized(qw)
    torch.testing.assert_close(m.dequantize(), qw.dequantize())


@pytest.mark.parametrize("rows", [1, 70])
def test_w8a8_equals_integer_math(rows):
    torch.manual_seed(rows)
    w, b = torch.randn(32, 64), torch.randn(32)
    m = W8A8Linear.from_quantized(quantize_rtn(w, 8, None, True), b)
    m.prepare()
    x = torch.randn(rows, 64) * 3
    sx = x.double().abs().amax(-1, keepdim=True) / 127
    xq = torch.round(x.double() / sx).clamp(-127, 127)
    ref = (xq @ m.qweight.double().t()) * sx * m.scale.double() + b.double()
    torch.testing.assert_close(m(x).double(), ref, atol=1e-4, rtol=1e-4)
    for int_mm in (False, True):  # both implementations, whichever was measured faster
        try:
            y = m._int_forward(x, int_mm)
        except RuntimeError:
            continue  # this PyTorch build has no CPU _int_mm
        torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-4)


def test_from_quantized_rejects_the_wrong_format():
    with pytest.raises(ValueError):
        Int8Linear.from_quantized(quantize_rtn(torch.randn(8, 64), 4, 32, False))
    with pytest.raises(ValueError):
        Int4Linear.from_quantized(QuantizedWeight(torch.zeros(8, 64, dtype=torch.int16), torch.ones(8, 1), None, 8, 64))


def test_float_zero_grid_refinds_a_min_offset_grid():
    """Weights that already lie on a d*q + min grid per group (GGUF Q4_1, fp16 d) come back with float_zero:
    the same codes and scales, the zero point within its fp16 rounding (2^-8 of a code below 16); the default
    integer zero point cannot represent an arbitrary min."""
    torch.manual_seed(0)
    d, m = (torch.rand(16, 4, 1) * 0.1 + 0.01).half().float(), torch.randn(16, 4, 1) * 0.2
    q = torch.randint(0, 16, (16, 4, 32)).float()
    q[..., 0], q[..., 1] = 0, 15  # every group uses its full range, as Q4_1 blocks do
    w = (d * q + m).view(16, 128)
    found = quantize_rtn(w, 4, 32, symmetric=False, float_zero=True)
    torch.testing.assert_close(found.q.view(16, 4, 32).float(), q)
    torch.testing.assert_close(found.scale, d[..., 0])
    zero = -m / d  # the exact zero point; fp16 keeps 11 significant bits of it
    bound = (d * zero.abs() * 2.0 ** -11 + 1e-6).expand(16, 4, 32).reshape(16, 128)
    assert ((found.dequantize() - w).abs() <= bound).all()
    m4 = Int4Linear.from_quantized(found)
    torch.testing.assert_close(m4.dequantize(), found.dequantize())  # fp16 storage loses nothing more
    assert (quantize_rtn(w, 4, 32).dequantize() - w).abs().max() > 1e-3


# ---- group-wise int8

def _grouped_int8(out: int, inp: int, group: int, bias: bool, seed: int) -> tuple[Int8Linear, QuantizedWeight]:
    g = torch.Generator().manual_seed(seed)
    # columns of very different size per group: a per-row scale would waste range, group scales differ
    w = torch.randn(out, inp, generator=g) * (torch.rand(inp, generator=g) * 3 + 0.1)
    b = torch.randn(out, generator=g) if bias else None
    qw = quantize_rtn(w, 8, group, symmetric=True)
    return Int8Linear.from_quantized(qw, b), qw


@pytest.mark.parametrize("group", [16, 32, 64])
def test_grouped_int8_stores_group_scales_losslessly(group):
    m, qw = _grouped_int8(40, 192, group, False, group)
    assert m.grouped and m.group_size == group and m.scale.shape == (40, 192 // group)
    torch.testing.assert_close(m.dequantize(), qw.dequantize(), atol=0, rtol=0)
    assert "group=" in repr(m)
    # a per-channel weight keeps today's 1-D scale (the checkpoint format of earlier versions)
    pc = Int8Linear.from_quantized(quantize_rtn(torch.randn(8, 64), 8, None, True))
    assert not pc.grouped and pc.scale.shape == (8,) and "group=" not in repr(pc)


def _fallback_forward(m: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    """The module's forward with the packed kernel switched off: dequantize-then-matmul for every row count."""
    m.packed_rows, m.native = 0, False
    return m(x)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("bias", [False, True])
def test_grouped_int8_linear_matches_fp64_reference(rows, bias):
    m, qw = _grouped_int8(48, 192, 32, bias, rows)
    x = torch.randn(rows, 192, generator=torch.Generator().manual_seed(100 + rows))
    ref = _reference(x, qw.dequantize(torch.float64), m.bias if bias else None)
    tol = dict(atol=1e-4 * ref.abs().max().item(), rtol=1e-5)
    torch.testing.assert_close(_fallback_forward(m, x).double(), ref, **tol)
    m.prepare()  # whatever this machine picks (the native kernel for few rows, where the build has it)
    torch.testing.assert_close(m(x).double(), ref, **tol)
    torch.testing.assert_close(m(x.view(1, rows, 192)).double(), ref.view(1, rows, 48), **tol)  # leading dims kept
    if not m.native:
        pytest.skip("the native kernels do not build here (fallback checked)")
    torch.testing.assert_close(m._native_mm(x).double(), ref, **tol)


@pytest.mark.parametrize("group", [16, 48, 96])
def test_grouped_int8_native_kernel_group_sizes(group):
    """Every group the kernel accepts (a multiple of 16 dividing in_features), 1 and 4 rows."""
    m, qw = _grouped_int8(33, 192, group, True, group)  # an odd row count: no assumption of 4-row blocks
    m.prepare()
    if not m.native:
        pytest.skip("the native kernels do not build here")
    for rows in (1, 4):
        x = torch.randn(rows, 192)
        ref = _reference(x, qw.dequantize(torch.float64), m.bias)
        torch.testing.assert_close(m._native_mm(x).double(), ref, atol=1e-4 * ref.abs().max().item(), rtol=1e-5)


def test_grouped_int8_never_takes_torch_int8pack():
    """PyTorch's int8 kernel applies one scale per row: a grouped module must not route to it."""
    m, _ = _grouped_int8(32, 128, 32, False, 0)
    m.prepare()
    assert m.native or m.packed_rows == 0
    m.native, m.packed_rows = False, 0
    m.prepare()  # again, as after loading
    assert m.scale_bf16 is None


def test_int8_embedding_rows_equal_the_dequantized_head():
    from miaotui.compress.quant.swap import Int8Embedding

    for group in (None, 32):
        head = Int8Linear.from_quantized(quantize_rtn(torch.randn(50, 64), 8, group, True))
        ids = torch.tensor([[3, 0, 49], [7, 7, 1]])
        emb = Int8Embedding(head)
        torch.testing.assert_close(emb(ids), head.dequantize()[ids], atol=0, rtol=0)


def test_int8_from_quantized_rejects_asymmetric_and_w8a8_rejects_groups():
    with pytest.raises(ValueError, match="symmetric"):
        Int8Linear.from_quantized(quantize_rtn(torch.randn(8, 64), 8, 32, symmetric=False))
    with pytest.raises(ValueError, match="per-channel"):
        W8A8Linear.from_quantized(quantize_rtn(torch.randn(8, 64), 8, 32, symmetric=True))
    with pytest.raises(ValueError, match="divide"):
        Int8Linear(64, 8, group_size=24)
