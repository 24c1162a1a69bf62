"""Microbenchmark: one decode-step matmul (1..4 rows) per SmolLM2-135M layer shape, PyTorch vs native kernels.

    python benchmarks/gemv.py                       # every shape, 1 row, int8/int4/bf16/fp32, 2 threads
    python benchmarks/gemv.py --rows 1,4 --threads 1 --json

For each (shape, weight format, rows) it times PyTorch's fastest CPU path for that format on this build
(int8: ``_weight_int8pack_mm`` with bf16 activations; int4: ``_weight_int4pack_mm_for_cpu``; bf16 and fp32:
``F.linear``) and the native kernel, interleaved (a loaded machine slows both alike), and reports the
median microseconds, the weight bytes read per microsecond (GB/s) and the ratio. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from miaotui import kernels
from miaotui.compress.quant.pack import pack_int4

SHAPES = {  # name: (out_features, in_features)
    "qkv 576→1728": (1728, 576),
    "gate_up 576→3072": (3072, 576),
    "down 1536→576": (576, 1536),
    "o 576→576": (576, 576),
    "head 576→49152": (49152, 576),
}
FORMATS = ("int8", "int4", "bf16", "fp32")


def _median_us(fns: list[Callable[[], object]], reps: int, budget_s: float) -> list[float]:
    """Median time of each function, runs interleaved so that machine load hits all of them alike."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    for r in range(reps):
        for fn, out in zip(fns, times):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        if r >= 5 and time.perf_counter() - start > budget_s:
            break
    return [statistics.median(t) * 1e6 for t in times]


def candidates(fmt: str, n: int, k: int, rows: int, group: int, seed: int = 0) -> tuple[int, Callable, Callable]:
    """(weight bytes, torch fn, native fn) for one format and shape."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g)
    if fmt == "int8":
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        s = torch.rand(n, generator=g) * 0.01
        sb = s.bfloat16()
        return (q.numel(), lambda: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q, sb).float(),
                lambda: kernels.int8_gemv(x, q, s))
    if fmt == "int4":
        codes = torch.randint(0, 16, (n, k), generator=g)
        s, z = torch.rand(n, k // group, generator=g) * 0.01, torch.full((n, k // group), 8.0)
        packed = pack_int4(codes)
        tw = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        sz = torch.stack([s.t(), torch.zeros_like(s.t())], -1).contiguous().bfloat16()
        return (packed.numel() + s.numel() * 8,
                lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), tw, group, sz).float(),
                lambda: kernels.int4_gemv(x, packed, s, z, group))
    w = torch.randn(n, k, generator=g).to(torch.bfloat16 if fmt == "bf16" else torch.float32)
    xw = x.to(w.dtype)
    return w.numel() * w.element_size(), lambda: F.linear(xw, w), lambda: kernels.dense_gemv(x, w)


def rotating(fmt: str, n: int, k: int, rows: int, group: int, footprint: int) -> tuple[int, Callable, Callable]:
    """Like ``candidates`` but cycling over enough copies of the weights to exceed ``footprint`` bytes, so
    that (as in a real decode step, which reads every layer once) the weights come from memory, not cache."""
    nbytes, ref, native = candidates(fmt, n, k, rows, group)
    copies = [(ref, native)] + [candidates(fmt, n, k, rows, group, seed)[1:] for seed in
                                range(1, -(-footprint // nbytes))]
    state = {"ref": 0, "native": 0}

    def call(which: str, index: int) -> object:
        state[which] = (state[which] + 1) % len(copies)
        return copies[state[which]][index]()

    return nbytes, lambda: call("ref", 0), lambda: call("native", 1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1", help="comma-separated activation row counts (default: 1)")
    p.add_argument("--formats", default=",".join(FORMATS), help="weight formats to time (int8,int4,bf16,fp32)")
    p.add_argument("--shapes", default="", help="comma-separated shape names (default: all); see SHAPES")
    p.add_argument("--group", type=int, default=64, help="int4 group size (a multiple of 32 dividing 576)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: PyTorch's default)")
    p.add_argument("--reps", type=int, default=200, help="timed repetitions per kernel (at most)")
    p.add_argument("--budget", type=float, default=2.0, help="seconds per (shape, format, rows) at most")
    p.add_argument("--footprint-mb", type=int, default=96,
                   help="cycle over copies of each weight totalling this many MB, larger than the CPU caches "
                        "(0: one copy, which then runs from cache for small shapes)")
    p.add_argument("--json", action="store_true", help="print only the final JSON line")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if not kernels.available():
        raise SystemExit("native kernels unavailable (see the log line above)")
    shapes = {s: SHAPES[s] for s in SHAPES if not a.shapes or s.split()[0] in a.shapes.split(",")}
    results = []
    if not a.json:
        print(f"threads={torch.get_num_threads()} isa={kernels.loaded_isa()} torch={torch.__version__}")
        print(f"{'shape':<18} {'fmt':<5} {'rows':>4} {'torch us':>9} {'native us':>9} {'torch GB/s':>10} "
              f"{'native GB/s':>11} {'speed-up':>8}")
    with torch.inference_mode():
        for name, (n, k) in shapes.items():
            for fmt in a.formats.split(","):
                for rows in (int(r) for r in a.rows.split(",")):
                    nbytes, ref, native = rotating(fmt, n, k, rows, a.group, a.footprint_mb << 20)
                    t_ref, t_nat = _median_us([ref, native], a.reps, a.budget)
                    r = dict(shape=name, format=fmt, rows=rows, torch_us=round(t_ref, 1), native_us=round(t_nat, 1),
                             torch_gbs=round(nbytes / t_ref / 1e3, 2), native_gbs=round(nbytes / t_nat / 1e3, 2),
                             speedup=round(t_ref / t_nat, 2))
                    results.append(r)
                    if not a.json:
                        print(f"{name:<18} {fmt:<5} {rows:>4} {t_ref:>9.1f} {t_nat:>9.1f} {r['torch_gbs']:>10.2f} "
                              f"{r['native_gbs']:>11.2f} {r['speedup']:>7.2f}x")
    print(json.dumps({"threads": torch.get_num_threads(), "isa": kernels.loaded_isa(), "results": results}))


if __name__ == "__main__":
    main()
