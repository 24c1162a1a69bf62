"""The one-pass RMSNorm, silu(gate)·up and rotary kernels (csrc/elementwise.cpp): equal to the PyTorch ops
they replace (computed in fp64) on widths that are and are not multiples of the vector width, strided rotary
inputs, one and two threads; bad inputs get an error; and a prepared model turns them on only where they
apply and gives the logits the PyTorch ops give."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from miaotui import kernels
from miaotui.models.base import RMSNorm, apply_rope

pytestmark = pytest.mark.skipif(not kernels.available(), reason="native kernels do not build on this machine")


@pytest.mark.parametrize("rows,cols", [(1, 576), (21, 576), (7, 13), (300, 960), (3, 8)])
def test_rms_norm_equals_the_fp64_formula(rows, cols):
    g = torch.Generator().manual_seed(rows * cols)
    x, w = torch.randn(rows, cols, generator=g), torch.randn(cols, generator=g)
    xd = x.double()
    ref = w.double() * (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-5).double(), ref, atol=2e-6 * ref.abs().max().item(),
                               rtol=1e-5)


def test_rms_norm_keeps_leading_dims():
    x, w = torch.randn(2, 5, 24), torch.randn(24)
    assert kernels.rms_norm(x, w, 1e-6).shape == (2, 5, 24)


@pytest.mark.parametrize("rows,width", [(1, 3072), (5, 14), (64, 3072), (2, 16)])
def test_silu_mul_equals_fp64(rows, width):
    g = torch.randn(rows, width, generator=torch.Generator().manual_seed(width)) * 6  # both tails of silu
    gate, up = g.double().chunk(2, -1)
    ref = F.silu(gate) * up
    torch.testing.assert_close(kernels.silu_mul(g).double(), ref, atol=1e-6 * ref.abs().max().item(), rtol=1e-6)


@pytest.mark.parametrize("b,h,t,d", [(1, 9, 21, 64), (2, 3, 5, 10), (1, 1, 1, 16), (3, 2, 7, 34)])
def test_rope_equals_rotate_half_on_strided_input(b, h, t, d):
    g = torch.Generator().manual_seed(b * h * t * d)
    x = torch.randn(b, t, h, d, generator=g).transpose(1, 2)  # heads as the projection lays them out
    cos, sin = torch.randn(t, d, generator=g), torch.randn(t, d, generator=g)
    ref = apply_rope(x.double(), cos.double(), sin.double())
    y = kernels.rope(x, cos, sin)
    assert y.is_contiguous()
    torch.testing.assert_close(y.double(), ref, atol=1e-6 * ref.abs().max().item(), rtol=1e-6)


@pytest.mark.parametrize("threads", [1, 2])
def test_one_and_two_threads_agree(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, w = torch.randn(500, 96), torch.randn(96)
        ref = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6), ref, atol=1e-5, rtol=1e-5)
        g = torch.randn(500, 96)
        torch.testing.assert_close(kernels.silu_mul(g), F.silu(g[:, :48]) * g[:, 48:], atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(before)


def test_bad_inputs_get_an_error():
    with pytest.raises(RuntimeError, match="weight must be"):
        torch.ops.miaotui.rms_norm(torch.randn(2, 8), torch.randn(7), 1e-6)
    with pytest.raises(RuntimeError, match="fp32"):
        torch.ops.miaotui.rms_norm(torch.randn(2, 8).double(), torch.randn(8), 1e-6)
    with pytest.raises(RuntimeError, match="even number"):
        torch.ops.miaotui.silu_mul(torch.randn(2, 7))
    with pytest.raises(RuntimeError, match="T x head_dim"):
        torch.ops.miaotui.rope(torch.randn(1, 2, 3, 8), torch.randn(2, 8), torch.randn(3, 8))


def test_opcheck():
    torch.library.opcheck(torch.ops.miaotui.rms_norm, (torch.randn(3, 24), torch.randn(24), 1e-6),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.miaotui.silu_mul, (torch.randn(3, 24),),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.miaotui.rope, (torch.randn(1, 2, 3, 8), torch.randn(3, 8), torch.randn(3, 8)),
                          test_utils=("test_schema", "test_faketensor"))


def test_norm_module_takes_the_kernel_only_for_fp32_inference():
    norm = RMSNorm(16, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    x = torch.randn(4, 16)
    plain = norm(x)
    norm.native_ops = True
    with torch.no_grad():
        torch.testing.assert_close(norm(x), plain, atol=1e-6, rtol=1e-6)
    assert norm(x).requires_grad  # autograd keeps PyTorch's ops
    xb = x.bfloat16()  # bf16 activations: PyTorch's ops, as without the flag
    with torch.no_grad():
        native = norm(xb)
        norm.native_ops = False
        assert torch.equal(native, norm(xb))


def test_prepared_model_turns_them_on_and_keeps_the_logits(hf_folder):
    from miaotui.engine.prepare import prepare_for_inference
    from miaotui.loading import load

    path, ref = hf_folder("llama-gqa-untied")
    model = prepare_for_inference(load(str(path), dtype="fp32").model)
    assert all(blk.mlp.native_ops and blk.self_attn.native_ops and blk.input_layernorm.native_ops
               for blk in model.model.layers) and model.model.norm.native_ops
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        torch.testing.assert_close(model(ids), ref(ids).logits, atol=1e-4, rtol=0)
