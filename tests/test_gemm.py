"""The native many-row GEMM (kernels.dense_gemm, csrc/gemm.cpp): equal to the fp64 product up to fp32
summation order on shapes that exercise every edge (rows not a multiple of the 6-row tile, features not a
multiple of 16 and fewer than 16, inputs split into several blocks or fewer than 8; for the few-row kernel,
1-32 rows in 1-4 vectors, features not a multiple of its 12-, 6- or 4-row groups, inputs not a multiple of
its 16-column unroll), bf16 weights, one and two threads; and how dense linears choose between it, the GEMV
and PyTorch by measured row counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from miaotui import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="native kernels do not build on this machine")

SHAPES = [(1, 37, 77), (5, 8, 5), (7, 16, 1), (13, 200, 33), (150, 48, 1536), (300, 100, 769), (6, 1000, 64),
          (8, 25, 300), (16, 13, 17), (17, 30, 2300), (24, 25, 576), (25, 40, 96), (32, 19, 100), (29, 14, 40)]


def close(y: torch.Tensor, ref: torch.Tensor, tol: float = 2e-6) -> None:
    torch.testing.assert_close(y.double(), ref, atol=tol * ref.abs().max().item(), rtol=1e-5)


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gemm_equals_fp64_matmul(m, n, k, dtype, with_bias):
    g = torch.Generator().manual_seed(m * n + k)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g) if with_bias else None
    ref = x.double() @ w.double().t() + (bias.double() if with_bias else 0)
    close(kernels.dense_gemm(x, w, bias), ref)


@pytest.mark.parametrize("threads", [1, 2])
def test_gemm_with_one_and_two_threads(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for m in (333, 11):  # the packed GEMM, the few-row one
            x, w, b = torch.randn(m, 520), torch.randn(200, 520), torch.randn(200)
            close(kernels.dense_gemm(x, w, b), x.double() @ w.double().t() + b.double())
    finally:
        torch.set_num_threads(before)


def test_gemm_takes_any_leading_shape_and_dtype():
    x = torch.randn(2, 3, 40)[:, :, :24]  # not contiguous
    w = torch.randn(10, 24)
    y = kernels.dense_gemm(x, w)
    assert y.shape == (2, 3, 10)
    close(y, x.double() @ w.double().t())
    xb = x.bfloat16()
    assert kernels.dense_gemm(xb, w.bfloat16()).dtype == torch.bfloat16
    assert kernels.dense_gemm(torch.randn(0, 24), w).shape == (0, 10)


def test_gemm_rejects_bad_inputs():
    with pytest.raises(RuntimeError, match="columns"):
        torch.ops.miaotui.gemm_dense(torch.randn(4, 8), torch.randn(3, 9), None)
    with pytest.raises(RuntimeError, match="fp32 or bf16"):
        torch.ops.miaotui.gemm_dense(torch.randn(4, 8), torch.randn(3, 8).half(), None)
    with pytest.raises(RuntimeError, match="bias"):
        torch.ops.miaotui.gemm_dense(torch.randn(4, 8), torch.randn(3, 8), torch.randn(4))


def test_gemm_opcheck():
    torch.library.opcheck(torch.ops.miaotui.gemm_dense, (torch.randn(9, 24), torch.randn(20, 24), torch.randn(20)),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("plan,expected", [
    ({8: "gemv", 16: "gemm", 32: "gemm", 64: "own", 128: "gemm", 512: "own"}, (8, 128, 0)),  # up to its last win
    ({8: "gemm", 16: "gemv", 32: "gemm"}, (4, 32, 0)),  # the GEMV only while it wins from the start
    ({8: "own", 16: "gemm"}, (4, 16, 0)),
    ({8: "own", 16: "own"}, (4, 0, 0)),
    ({8: "gemv", 16: "gemv", 32: "gemv", 64: "gemv"}, (64, 0, 0)),
    # oneDNN from just past the last bucket it did not win, if it won every bucket from there up
    ({8: "gemv", 16: "gemm", 32: "own", 64: "onednn", 128: "onednn", 512: "onednn"}, (8, 16, 33)),
    ({8: "gemv", 16: "gemm", 32: "onednn", 64: "own", 128: "onednn", 512: "onednn"}, (8, 16, 65)),
    ({8: "gemv", 16: "onednn", 32: "gemm", 512: "onednn"}, (8, 32, 33)),  # not below the GEMM's last win
    ({8: "gemv", 16: "gemm", 128: "onednn", 512: "own"}, (8, 16, 0)),  # lost at the most rows: never
    ({8: "onednn", 16: "onednn", 512: "onednn"}, (4, 0, 5)),
])
def test_row_kernels_split_the_measured_plan(plan, expected, monkeypatch):
    from miaotui.compress.quant import kernels as choice
    from miaotui.kernels.linear import row_kernels

    monkeypatch.setattr(choice, "fastest_by_rows", lambda *args, **kwargs: plan)
    lin = torch.nn.Linear(16, 8)
    assert row_kernels(lin, lin.forward) == expected


def test_linear_routes_rows_to_gemv_gemm_onednn_and_its_own_forward(monkeypatch):
    from miaotui.kernels import linear, onednn

    if not onednn.available():
        pytest.skip("this PyTorch build has no oneDNN linear")
    lin = torch.nn.Linear(40, 24).requires_grad_(False)  # inference weights; autograd: see below
    lin.__class__ = linear.GemvLinear
    lin.gemv_rows, lin.gemm_rows, lin.onednn_rows = 4, 16, 24
    calls = []
    for module, name in ((kernels, "dense_gemv"), (kernels, "dense_gemm"), (onednn, "linear")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _n=name, _r=real: calls.append(_n) or _r(*a))
    for rows in (3, 4, 5, 16, 17, 23, 24, 300):
        x = torch.randn(rows, 40)
        close(lin(x), x.double() @ lin.weight.double().t() + lin.bias.double())
    # 17 and 23 rows: nn.Linear's forward
    assert calls == ["dense_gemv", "dense_gemv", "dense_gemm", "dense_gemm", "linear", "linear"]
    x = torch.randn(30, 40, requires_grad=True)
    lin(x).sum().backward()  # autograd keeps PyTorch's path
    assert x.grad is not None and len(calls) == 6


def test_measured_choice_on_a_real_shape_is_consistent():
    """The timing picks some split (machine-dependent); whatever it picks, every row count computes the
    same product."""
    from miaotui.kernels.linear import GEMV_ROWS, ROW_BUCKETS, use_native_gemv

    model = torch.nn.Sequential(torch.nn.Linear(256, 384))
    assert use_native_gemv(model, measure=True) in (0, 1)
    lin = model[0]
    if type(lin) is torch.nn.Linear:
        pytest.skip("neither the native kernels nor oneDNN beat PyTorch here")
    # gemv_rows 0: the native GEMV lost on one row, and the module was swapped for oneDNN's many rows
    assert (lin.gemv_rows == 0 < lin.onednn_rows or GEMV_ROWS <= lin.gemv_rows <= 64) and lin.gemm_rows in (0, *ROW_BUCKETS)
    assert lin.onednn_rows == 0 or lin.onednn_rows > max(lin.gemv_rows, lin.gemm_rows)
    with torch.no_grad():
        for rows in sorted({1, lin.gemv_rows, lin.gemv_rows + 1, max(lin.gemm_rows, 1), lin.gemm_rows + 1,
                            max(lin.onednn_rows, 1), 600}):
            x = torch.randn(rows, 256)
            torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), atol=1e-4, rtol=1e-4)
