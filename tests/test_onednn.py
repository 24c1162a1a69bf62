"""oneDNN's linear (kernels/onednn.py), the many-row path of prepared dense linears: same products as an
fp64 reference, for fp32 and bf16, with and without bias, any leading shape, and a fused exact GELU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from miaotui.kernels import onednn

pytestmark = pytest.mark.skipif(not onednn.available(), reason="this PyTorch build has no oneDNN linear")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape", [(1, 40), (37, 40), (3, 130, 40)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_equals_the_fp64_product(dtype, tol, shape, bias):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g).to(dtype)
    w = torch.randn(24, 40, generator=g).to(dtype)
    b = torch.randn(24, generator=g).to(dtype) if bias else None
    y = onednn.linear(x, w, b)
    ref = F.linear(x.double(), w.double(), b.double() if bias else None)
    assert y.dtype == dtype and y.shape == (*shape[:-1], 24)
    scale = ref.abs().max().item()
    torch.testing.assert_close(y.double(), ref, atol=tol * scale, rtol=tol)


def test_fused_gelu_is_the_exact_erf_form():
    g = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(50, 32, generator=g), torch.randn(64, 32, generator=g), torch.randn(64, generator=g)
    ref = F.gelu(F.linear(x.double(), w.double(), b.double()))  # not the tanh approximation
    torch.testing.assert_close(onednn.linear(x, w, b, "gelu").double(), ref, atol=1e-5, rtol=1e-5)
    assert (F.gelu(ref, approximate="tanh") - ref).abs().max() > 1e-4  # the two forms differ at this tolerance


def test_a_non_contiguous_input_is_multiplied_as_it_reads():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 30, generator=g).t()  # (30, 40), transposed storage
    w = torch.randn(16, 40, generator=g)
    torch.testing.assert_close(onednn.linear(x, w), x @ w.t(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation,fn", [("gelu_new", lambda y: F.gelu(y, approximate="tanh")), ("relu", F.relu)])
def test_other_epilogues_match_their_activation(activation, fn):
    g = torch.Generator().manual_seed(4)
    x, w, b = torch.randn(20, 32, generator=g), torch.randn(48, 32, generator=g), torch.randn(48, generator=g)
    ref = fn(F.linear(x.double(), w.double(), b.double()))
    torch.testing.assert_close(onednn.linear(x, w, b, activation).double(), ref, atol=1e-5, rtol=1e-5)


def test_prepared_linear_fuses_the_activation_only_on_onednns_path(monkeypatch):
    from miaotui.kernels.linear import GemvLinear

    lin = torch.nn.Linear(32, 48).requires_grad_(False)
    lin.__class__ = GemvLinear
    lin.gemv_rows, lin.gemm_rows, lin.onednn_rows = 0, 0, 10
    fused = []
    real = onednn.linear
    monkeypatch.setattr(onednn, "linear", lambda *a: fused.append(a[3:]) or real(*a))
    for rows in (4, 10, 64):
        x = torch.randn(rows, 32)
        got = lin.forward_activated(x, "gelu", F.gelu)
        ref = F.gelu(F.linear(x.double(), lin.weight.double(), lin.bias.double()))
        torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    # 4 rows: nn.Linear's forward, then the activation; from 10 rows the epilogue
    assert fused == [("gelu",), ("gelu",)]
    x = torch.randn(64, 32)
    lin.forward_activated(x, "silu", F.silu)  # an activation oneDNN's epilogue does not take: the plain product
    assert fused[-1] == ()
