"""Native GEMV kernels (miaotui.kernels): each equals the dequantized fp64 matmul up to fp32 summation order,
on shapes that exercise every tail (in not a multiple of the vector width, out not a multiple of the row
tile, 1..8 and 13 activation rows: one and several passes per weight row); the modules use them, torch.compile calls them, and they can be turned off."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from miaotui import kernels
from miaotui.compress.quant.pack import pack_int4
from miaotui.compress.quant.qlinear import Int4Linear, Int8Linear, W8A8Linear
from miaotui.compress.quant.qtensor import quantize_rtn
from miaotui.kernels import build

pytestmark = pytest.mark.skipif(not kernels.available(), reason="native kernels do not build on this machine")

ODD_SHAPES = [(37, 77), (5, 8), (33, 200), (19, 1536)]  # (out, in)
ROWS = [1, 2, 3, 4, 5, 6, 7, 8, 13]


def close(y: torch.Tensor, ref: torch.Tensor, tol: float = 2e-6) -> None:
    """fp32 accumulation of the same products: a few ulps of the largest output, whatever the order
    (int4 and int8: ``INT16_TOL``, their activations are rounded to int16 per block of 32)."""
    torch.testing.assert_close(y.double(), ref, atol=tol * ref.abs().max().item(), rtol=max(1e-5, tol))


INT16_TOL = 1e-4  # int16 activations: < 2^-15 of each block's largest value, summed over K


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("rows", ROWS)
def test_int8_gemv_equals_dequantized_matmul(shape, rows):
    n, k = shape
    g = gen(n * k + rows)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scale, bias, x = torch.rand(n, generator=g) + 0.01, torch.randn(n, generator=g), torch.randn(rows, k, generator=g)
    ref = F.linear(x.double(), q.double() * scale.double()[:, None], bias.double())
    close(kernels.int8_gemv(x, q, scale, bias), ref, INT16_TOL)
    close(kernels.int8_gemv(x, q, scale), ref - bias.double(), INT16_TOL)


@pytest.mark.parametrize("group", [16, 32, 96])
@pytest.mark.parametrize("rows", ROWS)
def test_grouped_int8_gemv_equals_dequantized_matmul(group, rows):
    n, k = 37, 192
    g = gen(group * 10 + rows)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scale = torch.rand(n, k // group, generator=g) + 0.01
    bias, x = torch.randn(n, generator=g), torch.randn(rows, k, generator=g)
    w = (q.double().view(n, -1, group) * scale.double()[..., None]).reshape(n, k)
    close(kernels.int8_gemv(x, q, scale, bias), F.linear(x.double(), w, bias.double()), INT16_TOL)


def test_grouped_int8_needs_whole_vector_groups():
    q = torch.zeros(4, 96, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        kernels.int8_gemv(torch.randn(1, 96), q, torch.ones(4, 12))  # groups of 8 columns


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("rows", ROWS)
def test_dense_gemv_equals_matmul(dtype, shape, rows):
    n, k = shape
    g = gen(n + k + rows)
    w, x = torch.randn(n, k, generator=g).to(dtype), torch.randn(rows, k, generator=g)
    bias = torch.randn(n, generator=g).to(dtype)
    close(kernels.dense_gemv(x, w, bias), F.linear(x.double(), w.double(), bias.double()))


@pytest.mark.parametrize("group,shape", [(32, (37, 96)), (32, (19, 576)), (64, (48, 128)), (96, (33, 576)),
                                         (128, (5, 1536)), (128, (17, 256))])
@pytest.mark.parametrize("rows", ROWS)
def test_int4_gemv_equals_dequantized_matmul(group, shape, rows):
    n, k = shape
    g = gen(group + n + rows)
    codes = torch.randint(0, 16, (n, k), generator=g)
    codes[0, :] = 15  # every nibble position at its maximum once (nibble 7 is shifted, not masked)
    scale = (torch.rand(n, k // group, generator=g) + 0.01).half()
    zero = (torch.rand(n, k // group, generator=g) * 15).half()  # float zero points (Q4_1-style grids) as well
    bias, x = torch.randn(n, generator=g), torch.randn(rows, k, generator=g)
    w = ((codes.double().view(n, -1, group) - zero.double()[..., None]) * scale.double()[..., None]).view(n, k)
    close(kernels.int4_gemv(x, pack_int4(codes), scale, zero, group, bias), F.linear(x.double(), w, bias.double()),
          INT16_TOL)


def test_leading_dims_and_dtype_follow_the_input():
    g = gen(0)
    q, scale = torch.randint(-127, 128, (24, 64), dtype=torch.int8, generator=g), torch.rand(24, generator=g)
    x = torch.randn(2, 1, 64, generator=g).bfloat16()
    y = kernels.int8_gemv(x, q, scale)
    assert y.shape == (2, 1, 24) and y.dtype == torch.bfloat16
    ref = F.linear(x.double(), q.double() * scale.double()[:, None])
    torch.testing.assert_close(y.double(), ref, atol=1e-2 * ref.abs().max().item(), rtol=1e-2)  # bf16 output


def test_bad_inputs_are_refused():
    q, scale = torch.zeros(8, 64, dtype=torch.int8), torch.ones(8)
    with pytest.raises(RuntimeError, match="columns"):
        torch.ops.miaotui.gemv_int8(torch.zeros(1, 32), q, scale, None)
    with pytest.raises(RuntimeError, match="group_size"):
        torch.ops.miaotui.gemv_int4(torch.zeros(1, 64), torch.zeros(8, 32, dtype=torch.uint8), torch.ones(8, 4),
                                    torch.ones(8, 4), 16, None)
    with pytest.raises(RuntimeError, match="fp16"):  # int4 scales and zeros are fp16 (Int4Linear's buffers)
        torch.ops.miaotui.gemv_int4(torch.zeros(1, 64), torch.zeros(8, 32, dtype=torch.uint8), torch.ones(8, 2),
                                    torch.ones(8, 2), 32, None)


@pytest.mark.parametrize("op,args", [
    ("gemv_int8", lambda: (torch.randn(3, 40), torch.randint(-127, 128, (9, 40), dtype=torch.int8), torch.rand(9),
                           torch.randn(9))),
    ("gemv_int4", lambda: (torch.randn(2, 64), torch.randint(0, 256, (9, 32), dtype=torch.uint8),
                           torch.rand(9, 2).half(), (torch.rand(9, 2) * 15).half(), 32, None)),
    ("gemv_dense", lambda: (torch.randn(1, 40), torch.randn(9, 40).bfloat16(), None)),
])
def test_custom_ops_pass_opcheck(op, args):
    """Schema, fake (meta) implementation and dispatch agree: what torch.compile relies on."""
    torch.library.opcheck(getattr(torch.ops.miaotui, op), args(), test_utils=("test_schema", "test_faketensor"))


def _quantized_pair(seed: int, bias: bool = True) -> tuple[Int8Linear, Int4Linear, torch.Tensor]:
    g = gen(seed)
    w, b = torch.randn(40, 96, generator=g), torch.randn(40, generator=g)
    m8 = Int8Linear.from_quantized(quantize_rtn(w, 8, None, True), b if bias else None)
    m4 = Int4Linear.from_quantized(quantize_rtn(w, 4, 32, symmetric=False), b if bias else None)
    for m in (m8, m4):
        m.prepare()
    return m8, m4, torch.randn(3, 96, generator=g)


def test_quantized_linears_use_the_native_kernels(native_preferred):
    m8, m4, x = _quantized_pair(0)
    for m in (m8, m4):
        assert m.native and m.packed_rows >= 1 and "native" in m.extra_repr()
        close(m(x[:1]), F.linear(x[:1].double(), m.dequantize().double(), m.bias.double()),
              INT16_TOL)
    assert m4.kernel_weight is None  # one copy of the int4 weights: the checkpoint's own layout


def test_w8a8_few_rows_run_native_integer_math():
    g = gen(1)
    m = W8A8Linear.from_quantized(quantize_rtn(torch.randn(24, 80, generator=g), 8, None, True), torch.randn(24))
    m.prepare()
    x = torch.randn(2, 80, generator=g) * 3
    xq, sx = m.quantize_activations(x)
    ref = (xq.double() @ m.qweight.double().t()) * sx.double() * m.scale.double() + m.bias.double()
    assert m.packed_rows >= 2
    close(m(x), ref)


def test_disabled_by_environment_falls_back(monkeypatch, caplog):
    monkeypatch.setenv(build.ENV, "0")
    assert build.choose_isa() == (None, f"{build.ENV}=0")
    assert not kernels.available()
    m8, m4, x = _quantized_pair(2)
    for m in (m8, m4):
        assert not m.native
        ref = F.linear(x.double(), m.dequantize().double(), m.bias.double())
        torch.testing.assert_close(m(x).double(), ref, atol=0.05 * ref.abs().max().item(), rtol=0.02)  # bf16 kernels
    monkeypatch.setenv(build.ENV, "1")
    assert kernels.available()


def test_a_process_started_disabled_can_still_load(monkeypatch):
    """Turning the kernels off for one model must not turn them off for the rest of the process."""
    monkeypatch.setattr(build, "_state", {"fakes": True})  # as in a fresh process (the library is loaded once)
    monkeypatch.setenv(build.ENV, "0")
    assert not kernels.available() and "ok" not in build._state
    monkeypatch.setenv(build.ENV, "1")
    assert kernels.available() and build.loaded_isa() is not None


def test_isa_follows_cpu_flags(monkeypatch):
    monkeypatch.setattr(build.platform, "machine", lambda: "x86_64")
    avx512 = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"}
    for flags, isa in [({"avx2", "fma", "f16c"}, "avx2"), ({"avx", "sse4_2"}, None), (avx512, "avx512")]:
        monkeypatch.setattr(build, "cpu_flags", lambda f=flags: frozenset(f))
        assert build.choose_isa()[0] == isa
    monkeypatch.setenv(build.ENV, "avx2")  # force the 256-bit build on an AVX-512 CPU
    assert build.choose_isa()[0] == "avx2"


def test_prepared_dense_models_use_native_gemv(hf_folder, native_preferred, monkeypatch):
    from miaotui.cpu import has_native_bf16

    monkeypatch.setenv("MIAOTUI_NATIVE_DENSE", "1")  # the default, whatever the caller's environment
    from miaotui.engine.prepare import GemvUpcastLinear, prepare_for_inference
    from miaotui.kernels.linear import GEMV_ROWS, ROW_BUCKETS, GemvLinear
    from miaotui.loading import build_model
    from miaotui.loading.hf import load_hf_weights, read_hf_config

    path, _ = hf_folder("llama-mha-tied")
    bf16_cls = GemvLinear if has_native_bf16() else GemvUpcastLinear  # see engine/prepare.py
    for dtype, cls in [(torch.float32, GemvLinear), (torch.bfloat16, bf16_cls)]:
        model = prepare_for_inference(build_model(read_hf_config(path), load_hf_weights(path, dtype), dtype))
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        assert linears and all(type(m) is cls for m in linears)
        assert model.lm_head.weight is model.model.embed_tokens.weight  # the tie survives the swap
        head = model.lm_head
        x = torch.randn(2, 1, head.in_features).to(dtype)
        ref = F.linear(x.double(), head.weight.double())
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-5  # bf16: the output is rounded to bf16
        torch.testing.assert_close(head(x).double(), ref, atol=tol * ref.abs().max().item(), rtol=tol)
        # up to the measured crossovers the native GEMV, then the native GEMM, beyond them the class's old path
        assert GEMV_ROWS <= head.gemv_rows <= 64 and head.gemm_rows in (0, *ROW_BUCKETS)
        top = max(head.gemv_rows, head.gemm_rows)
        for rows in sorted({head.gemv_rows, top}):
            some = torch.randn(rows, head.in_features).to(dtype)
            ref = F.linear(some.double(), head.weight.double())
            torch.testing.assert_close(head(some).double(), ref, atol=tol * ref.abs().max().item(), rtol=tol)
        many = torch.randn(top + 1, head.in_features).to(dtype)
        assert torch.equal(head(many), cls.__mro__[2].forward(head, many))


def test_compiled_decode_with_native_quantized_linears_equals_eager(hf_folder, native_preferred):
    """A tiny llama with int8 and int4 linears: the compiled decode step (fullgraph: no graph break around
    the custom ops) gives the eager step's logits."""
    from miaotui.compress.quant.swap import quantize_head, swap_linears
    from miaotui.engine.prepare import prepare_for_inference
    from miaotui.engine.runner import Runner
    from miaotui.loading import build_model
    from miaotui.loading.hf import load_hf_weights, read_hf_config

    path, _ = hf_folder("llama-gqa-untied")
    model = build_model(read_hf_config(path), load_hf_weights(path, torch.float32), torch.float32)
    qweights = {}
    for i, layer in enumerate(model.model.layers):
        for name, lin in [("self_attn.q_proj", layer.self_attn.q_proj), ("self_attn.o_proj", layer.self_attn.o_proj),
                          ("mlp.gate_proj", layer.mlp.gate_proj), ("mlp.down_proj", layer.mlp.down_proj)]:
            bits, group = (8, None) if i % 2 == 0 else (4, 32)
            qweights[f"model.layers.{i}.{name}"] = quantize_rtn(lin.weight, bits, group, symmetric=bits == 8)
    swap_linears(model, qweights)
    quantize_head(model)
    prepare_for_inference(model)
    kinds = {type(m).__name__ for m in model.modules() if getattr(m, "native", False)}
    assert kinds == {"Int8Linear", "Int4Linear"}
    model.setup_cache(batch=1, max_seq_len=32)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    runner = Runner(model, compile=True, native=False)  # the compiled graph, not the fused native step
    with torch.no_grad():
        runner.prefill(ids)
        token = torch.tensor([[11]])
        eager = model(token, 5, last_only=True)[:, -1]
        compiled = runner.decode(token, 5)  # the same position again: same cache contents, same logits
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


def test_dense_swap_keeps_pytorch_where_it_measures_faster(monkeypatch):
    from miaotui.compress.quant import kernels as choice
    from miaotui.kernels.linear import GemvLinear, use_native_gemv

    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Linear(48, 8).bfloat16())
    monkeypatch.setattr(choice, "native_faster", lambda *args, **kwargs: False)
    # nor does oneDNN win at any row count: PyTorch's forward everywhere
    monkeypatch.setattr(choice, "fastest_by_rows", lambda key, cands, *a, **k: {n: "own" for n in (8, 512)})
    assert use_native_gemv(model) == 0 and type(model[0]) is torch.nn.Linear
    # oneDNN wins the many-row products: swapped, one row still PyTorch's (no native GEMV)
    monkeypatch.setattr(choice, "fastest_by_rows", lambda key, cands, *a, **k: {8: "own", 512: "onednn"})
    assert use_native_gemv(model) == 2 and all(type(m) is GemvLinear for m in model)
    assert [(m.gemv_rows, m.gemm_rows, m.onednn_rows) for m in model] == [(0, 0, 9)] * 2
    monkeypatch.setattr(choice, "native_faster", lambda *args, **kwargs: True)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Linear(48, 8).bfloat16())
    assert use_native_gemv(model) == 2 and all(type(m) is GemvLinear for m in model)


def test_self_check_passes_here_and_catches_a_wrong_kernel(monkeypatch):
    """Every process checks the build against fp64 before using it (the AVX-512 variant is never run by
    this suite on an AVX2 machine): it passes here, and a kernel returning wrong numbers is named."""
    assert build._self_check() is None

    real = torch.ops.miaotui

    class Ops:  # gemv_int8 1% off; the others real
        gemv_int8 = staticmethod(lambda x, q, s, b: real.gemv_int8(x, q, s, b) * 1.01)
        gemv_int4 = staticmethod(real.gemv_int4)
        gemv_dense = staticmethod(real.gemv_dense)
        gemm_dense = staticmethod(real.gemm_dense)

    class FakeTorchOps:
        miaotui = Ops

    monkeypatch.setattr(build.torch, "ops", FakeTorchOps)
    assert build._self_check() == "int8"
    Ops.gemv_int8 = staticmethod(real.gemv_int8)
    Ops.gemm_dense = staticmethod(lambda x, w, b: real.gemm_dense(x, w, b) * 1.01)
    assert build._self_check() == "gemm-fp32"
