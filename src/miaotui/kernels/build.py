"""Compile (once per machine, cached by PyTorch) and load the native GEMV kernels in ``csrc/``.

The kernels are built for the SIMD level this CPU has (AVX-512, else AVX2 + FMA), so the build happens at
run time with ``torch.utils.cpp_extension.load``: the first use pays about a minute of compiling, later
processes load the cached library in milliseconds. Anything that stops it (no compiler, no AVX2, an
unsupported platform, ``MIAOTUI_NATIVE=0``) leaves PyTorch's own kernels in place, with one log line.

Environment: ``MIAOTUI_NATIVE=0`` disables the native kernels; ``MIAOTUI_NATIVE=avx2`` builds the AVX2
variant even on an AVX-512 CPU (for comparison).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from pathlib import Path

import torch

from miaotui.cpu import cpu_flags

log = logging.getLogger("miaotui.kernels")

ENV = "MIAOTUI_NATIVE"
CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / "gemv.cpp", CSRC / "gemm.cpp", CSRC / "decode_step.cpp", CSRC / "attention.cpp",
           CSRC / "elementwise.cpp"]
# -fopenmp: at::parallel_for is an inline OpenMP region in ATen's headers; compiled without it, the
# "parallel" loop silently runs on one thread (measured: 14.8 GB/s at 1 and at 2 threads)
_COMMON = ["-O3", "-std=c++17", "-fno-math-errno", "-fopenmp"]
ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
}
_ISA_NEEDS = {"avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"}, "avx2": {"avx2", "fma", "f16c"}}

_lock = threading.Lock()
_state: dict[str, object] = {}  # ok / isa: the build's outcome; fakes: registered; off_logged: last reason


def choose_isa() -> tuple[str | None, str]:
    """(ISA variant to build, or None; why) from the environment and this CPU's flags."""
    setting = os.environ.get(ENV, "1").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return None, f"{ENV}={setting}"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"no native kernels for {platform.machine()}"
    flags = cpu_flags()
    wanted = [setting] if setting in ISA_FLAGS else list(ISA_FLAGS)
    for isa in wanted:
        if _ISA_NEEDS[isa] <= flags:
            return isa, ""
    return None, f"this CPU lacks {' + '.join(sorted(_ISA_NEEDS[wanted[-1]] - flags))}"


def _register_fakes() -> None:
    """Shapes for tracing (torch.compile, meta tensors): the ops are registered in C++, their fakes here."""

    if _state.get("fakes"):
        return

    def rows_by_out(x: torch.Tensor, weight: torch.Tensor, *_args) -> torch.Tensor:
        return x.new_empty(x.shape[0], weight.shape[0])

    for op in ("gemv_int8", "gemv_int4", "gemv_dense", "gemm_dense"):
        torch.library.register_fake(f"miaotui::{op}")(rows_by_out)
    torch.library.register_fake("miaotui::varlen_attention")(
        lambda qkv, cu_seqlens, heads, scale: qkv.new_empty(qkv.shape[0], qkv.shape[1] // 3))
    torch.library.register_fake("miaotui::paged_decode_attention")(lambda q, *_args: torch.empty_like(q))
    torch.library.register_fake("miaotui::rms_norm")(lambda x, weight, eps: torch.empty_like(x))
    torch.library.register_fake("miaotui::silu_mul")(lambda g: g.new_empty(g.shape[0], g.shape[1] // 2))
    torch.library.register_fake("miaotui::rope")(lambda x, cos, sin: x.new_empty(x.shape))
    _state["fakes"] = True


def load() -> bool:
    """Build/load the kernels once per process; True when ``torch.ops.miaotui.gemv_*`` are usable.

    ``MIAOTUI_NATIVE=0`` is read on every call: it turns the kernels off for modules prepared while it is
    set, and a later call without it still builds/loads them (only a failed build is remembered)."""
    isa, why = choose_isa()
    if isa is None:
        if _state.get("off_logged") != why:  # one line per reason, not one per module
            log.warning("miaotui: native GEMV kernels off (%s); using PyTorch's kernels", why)
            _state["off_logged"] = why
        return False
    with _lock:
        if "ok" not in _state:
            _state["ok"], _state["isa"] = _load(isa)
    return bool(_state["ok"])


def loaded_isa() -> str | None:
    """The ISA variant that was loaded (after ``load()``), or None."""
    return _state.get("isa") if _state.get("ok") else None  # type: ignore[return-value]


def _load(isa: str) -> tuple[bool, str | None]:
    # PyTorch rebuilds when a source changes, not a header: the name carries a hash of all of csrc/
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in sorted(CSRC.iterdir()) if f.is_file())).hexdigest()
    name = f"miaotui_gemv_{isa}_{digest[:10]}"
    try:
        from torch.utils import cpp_extension

        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
        if not any(build_dir.glob("*.so")):
            log.warning("miaotui: compiling native GEMV kernels for %s (first use only, about a minute; cached in %s)",
                        isa, build_dir)
        cpp_extension.load(name=name, sources=[str(s) for s in SOURCES], extra_cflags=_COMMON + ISA_FLAGS[isa],
                           extra_ldflags=["-fopenmp"],
                           is_python_module=False, verbose=False)
        _register_fakes()
        bad = _self_check()
        if bad:
            log.warning("miaotui: native GEMV kernels (%s) disagree with the reference on %s; using PyTorch's "
                        "kernels", isa, bad)
            return False, None
    except Exception as e:  # a missing compiler or headers surfaces as many exception types  # noqa: BLE001
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.warning("miaotui: native GEMV kernels unavailable (%s: %s); using PyTorch's kernels",
                    type(e).__name__, first[:200])
        return False, None
    return True, isa


def _self_check() -> str | None:
    """Run each op once on small odd shapes against an fp64 reference; the name of the first that is off.

    A build for an instruction set this project's tests never ran on (AVX-512 on an AVX2 development
    machine) must not silently return wrong numbers, so every process checks before using the kernels."""
    from miaotui.compress.quant.pack import pack_int4

    g = torch.Generator().manual_seed(0)
    rows, out_f, in_f, group = 3, 37, 320, 32  # 10 blocks of 32: a full chunk of 8 and a tail (int4)
    x = torch.randn(rows, in_f, generator=g)
    bias = torch.randn(out_f, generator=g)
    q8 = torch.randint(-127, 128, (out_f, in_f), generator=g, dtype=torch.int8)
    s8 = torch.rand(out_f, generator=g) + 0.5
    q4 = torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.uint8)
    s4 = (torch.rand(out_f, in_f // group, generator=g) + 0.5).half()
    z4 = torch.randint(0, 16, (out_f, in_f // group), generator=g).half()
    w4 = (q4.double().view(out_f, -1, group) - z4.double()[..., None]) * s4.double()[..., None]
    s8g = torch.rand(out_f, in_f // group, generator=g) + 0.5
    dense = torch.randn(out_f, in_f, generator=g)
    # the GEMM on 13 rows (two 6-row tiles and a tail), 37 features (a 16-wide tail) and 320 inputs (two blocks)
    xg = torch.randn(13, in_f, generator=g)
    cases = {  # name: (the op's output, its input rows, the fp64 weight it should have multiplied by)
        "int8": (torch.ops.miaotui.gemv_int8(x, q8, s8, bias), x, q8.double() * s8.double()[:, None]),
        "int8-grouped": (torch.ops.miaotui.gemv_int8(x, q8, s8g, bias), x,
                         (q8.double().view(out_f, -1, group) * s8g.double()[..., None]).reshape(out_f, in_f)),
        "int4": (torch.ops.miaotui.gemv_int4(x, pack_int4(q4), s4, z4, group, bias), x, w4.reshape(out_f, in_f)),
        "fp32": (torch.ops.miaotui.gemv_dense(x, dense, bias), x, dense.double()),
        "bf16": (torch.ops.miaotui.gemv_dense(x, dense.bfloat16(), bias), x, dense.bfloat16().double()),
        "gemm-fp32": (torch.ops.miaotui.gemm_dense(xg, dense, bias), xg, dense.double()),
        "gemm-bf16": (torch.ops.miaotui.gemm_dense(xg, dense.bfloat16(), bias), xg, dense.bfloat16().double()),
    }
    for name, (got, rows, w) in cases.items():
        want = rows.double() @ w.t() + bias.double()
        if not torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max())):
            return name
    return _attention_self_check(g) or _elementwise_self_check(g)


def _attention_self_check(g: torch.Generator) -> str | None:
    """varlen_attention on 3 sequences (a tail of 4 queries and of 16 keys) against fp64 per sequence."""
    heads, dim, lengths = 3, 40, [5, 19, 1]  # head_dim 40: a 32-wide and an 8-wide pass over the values
    qkv = torch.randn(sum(lengths), 3 * heads * dim, generator=g) * 2
    cu = torch.tensor([0] + lengths).cumsum(0)
    got = torch.ops.miaotui.varlen_attention(qkv, cu, heads, dim ** -0.5)
    for b in range(len(lengths)):
        q, k, v = qkv[cu[b]:cu[b + 1]].double().view(-1, 3, heads, dim).permute(1, 2, 0, 3)
        want = torch.softmax(q @ k.transpose(-1, -2) * dim ** -0.5, -1) @ v  # (H, T, D)
        if not torch.allclose(got[cu[b]:cu[b + 1]].double(), want.transpose(0, 1).reshape(-1, heads * dim),
                              rtol=1e-4, atol=1e-5):
            return "varlen_attention"
    # paged: 2 sequences of 11 and 4 keys in blocks of 4 (a full group of 8 keys and tails), 2 queries per KV head
    pool_k, pool_v = torch.randn(2, 6 * 4, 2, 16, generator=g)
    tables, lens = torch.tensor([[5, 0, 3], [2, 0, 0]]), torch.tensor([11, 4])
    q = torch.randn(2, 4, 16, generator=g)
    got = torch.ops.miaotui.paged_decode_attention(q, pool_k, pool_v, tables, lens, 4, 0.25, 0)
    for b in range(2):
        slots = (tables[b, :, None] * 4 + torch.arange(4)).flatten()[:lens[b]]
        k, v = pool_k[slots].double().repeat_interleave(2, 1), pool_v[slots].double().repeat_interleave(2, 1)
        want = torch.einsum("hs,shd->hd", torch.softmax(torch.einsum("hd,shd->hs", q[b].double(), k) * 0.25, -1), v)
        if not torch.allclose(got[b].double(), want, rtol=1e-4, atol=1e-5):
            return "paged_decode_attention"
    return None


def _elementwise_self_check(g: torch.Generator) -> str | None:
    """rms_norm, silu_mul and rope on widths with a vector tail against their fp64 formulas."""
    x, w = torch.randn(3, 21, generator=g), torch.randn(21, generator=g)
    xd = x.double()
    norm = w.double() * xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5)
    gate, up = xd[:, :10] * 4, xd[:, 10:20]
    xr = torch.randn(1, 2, 4, 20, generator=g).transpose(1, 2)  # [B, H, T, D] as the projection lays it out
    cos, sin = torch.randn(2, 2, 20, generator=g)
    rot = torch.cat([-xr[..., 10:], xr[..., :10]], -1).double()
    cases = {"rms_norm": (torch.ops.miaotui.rms_norm(x, w, 1e-5), norm),
             "silu_mul": (torch.ops.miaotui.silu_mul(torch.cat([x[:, :10] * 4, x[:, 10:20]], 1).contiguous()),
                          torch.nn.functional.silu(gate) * up),
             "rope": (torch.ops.miaotui.rope(xr, cos, sin), xr.double() * cos.double() + rot * sin.double())}
    for name, (got, want) in cases.items():
        if not torch.allclose(got.double(), want, rtol=1e-4, atol=1e-5):
            return name
    return None
