"""Which kernel each quantized matmul uses, chosen by measurement on this machine.

Packed kernels read 4–8x fewer bytes than an fp32 matmul, which is what a one-row decode step is bound by:
miaotui's native GEMV kernels (``miaotui.kernels``: fp32 activations, exact up to summation order) where
they build, else PyTorch's (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``: bf16 activations).
With many rows (prefill, large batches) the matmul is compute-bound and dequantize-then-fp32-matmul wins.
The crossover row count depends on the CPU and the shape, so it is measured once per shape (a few ms) and
cached for the process.

Timings are only trusted on cores this process has to itself (``cpu_contended``): while another process
keeps them busy, a native kernel's threads wait milliseconds for one the OS has descheduled, MKL's
single-threaded GEMV does not, and the choice, cached for the process, would send every decode step to
the slower kernel once the machine is quiet again (seen: all but one of SmolLM2's 121 linears). Then the
defaults below are used, and not cached.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger("miaotui.kernels")

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
_crossover: dict[tuple, int] = {}
_plans: dict[tuple, dict[int, str]] = {}
# a one-row native GEMV over 2 MB of fp32 weights takes 10-60 us on idle cores (from cache or memory); at
# 1 ms it has waited for a descheduled thread (measured here under a 2-thread training job: 3.7-5 ms)
CONTENDED_S = 1e-3
PROBE_EVERY_S = 1.0  # one probe serves the ~100 linears of a model being prepared
_probe: dict[str, float] = {"at": float("-inf"), "seconds": 0.0, "warned": 0.0}


def _time(fn: Callable[[], object], reps: int = 5, cold: bool = False) -> float:
    """Best of ``reps`` calls after one warm-up; ``cold``: each call after the caches are flushed."""
    fn()
    flush = torch.empty(flush_bytes() // 4) if cold else None
    best = float("inf")
    for _ in range(reps):
        if flush is not None:
            flush.fill_(0.0)  # writes twice the last-level cache: fn's weights come from memory again
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


@functools.cache  # read once: every cold timing asks
def cache_bytes() -> int:
    """This CPU's largest (last-level) cache from sysfs; 32 MB where it cannot be read."""
    size = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
            size = max(size, int(text.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(text[-1:], 0))
        except (OSError, ValueError):
            continue
    return size or 32 << 20


def flush_bytes() -> int:
    """Twice the last-level cache, at least 64 MB: writing that much evicts everything else."""
    return max(2 * cache_bytes(), 64 << 20)


def cpu_contended() -> bool:
    """Whether another process is competing for this process's cores now (see the module's docstring):
    a one-row native GEMV, timed 10 times, never finished within ``CONTENDED_S``. Re-probed at most once
    every ``PROBE_EVERY_S``; False with one thread or without the native kernels."""
    from miaotui import kernels as native

    if torch.get_num_threads() < 2 or not native.available():
        return False
    now = time.monotonic()
    if now - _probe["at"] > PROBE_EVERY_S:
        w, x = torch.randn(512, 1024), torch.randn(1, 1024)
        with torch.inference_mode():
            _probe["seconds"] = _time(lambda: native.dense_gemv(x, w), reps=10)
        _probe["at"] = now
    busy = _probe["seconds"] > CONTENDED_S
    if busy and not _probe["warned"]:
        log.warning("miaotui: another process is using this machine's cores (a 2 MB native GEMV took %.1f ms at "
                    "best): kernels are chosen by default rules instead of timings; prepare the model on an idle "
                    "machine, or with fewer threads, for the measured choice", 1e3 * _probe["seconds"])
        _probe["warned"] = 1.0
    return busy


def packed_rows_limit(key: tuple, packed: Callable[[torch.Tensor], object],
                      reference: Callable[[torch.Tensor], object], in_features: int, assume: int = 0) -> int:
    """Largest row count (0 = none) up to which ``packed(x)`` beats ``reference(x)``; cached by ``key``.

    ``assume``: a row count known to favour the packed kernel (it reads the weights once, the reference
    dequantizes all of them first), so only larger counts are timed and noise cannot turn decode off."""
    if key not in _crossover:
        if cpu_contended():
            return assume
        limit = assume
        with torch.inference_mode():
            for rows in (r for r in ROW_BUCKETS if r > assume):
                x = torch.randn(rows, in_features)
                try:
                    faster = _time(lambda: packed(x)) < _time(lambda: reference(x))
                except RuntimeError:  # the kernel refuses this shape/dtype on this build
                    break
                if not faster:
                    break
                limit = rows
        _crossover[key] = limit
    return _crossover[key]


def faster_at(key: tuple, candidate: Callable[[torch.Tensor], object], reference: Callable[[torch.Tensor], object],
              in_features: int, rows: int) -> bool:
    """Whether ``candidate`` beats ``reference`` on ``rows`` rows (False if it fails); cached by ``key``."""
    if key not in _crossover:
        with torch.inference_mode():
            x = torch.randn(rows, in_features)
            try:
                _crossover[key] = int(_time(lambda: candidate(x)) < _time(lambda: reference(x)))
            except RuntimeError:
                _crossover[key] = 0
    return bool(_crossover[key])


def fastest_by_rows(key: tuple, candidates: dict[str, Callable[[torch.Tensor], object]], in_features: int,
                    rows: tuple[int, ...], max_rows: dict[str, int] | None = None,
                    default: dict[int, str] | None = None, cold: bool = False,
                    handicap: dict[str, float] | None = None) -> dict[int, str]:
    """The fastest of ``candidates`` (name → fn) at each row count; a candidate that fails, or is past its
    ``max_rows``, is not timed there. Cached by ``key``; ``default`` (of ``rows``) while the cores are
    contended. ``cold``: timed with the caches flushed before each call, as a decode step meets each
    layer's weights (the model's weights do not fit in cache). ``handicap``: name → factor its time is
    multiplied by before the comparison (a candidate that must win by a margin to be chosen)."""
    if key not in _plans:
        if cpu_contended():
            return {n: name for n, name in (default or {}).items() if n in rows}
        plan = {}
        with torch.inference_mode():
            for n in rows:
                x = torch.randn(n, in_features)
                times = {}
                for name, fn in candidates.items():
                    if n > (max_rows or {}).get(name, n):
                        continue
                    try:
                        times[name] = _time(lambda: fn(x), cold=cold)
                    except RuntimeError:  # the kernel refuses this shape/dtype on this build
                        pass
                if times:
                    plan[n] = min(times, key=lambda name: times[name] * (handicap or {}).get(name, 1.0))
        _plans[key] = plan
    return _plans[key]


NATIVE_ASSUMED_ROWS = 4  # the native kernels take 4 activation rows per pass over the weights


def native_supported(weight: torch.Tensor) -> bool:
    """Whether miaotui's native GEMV kernels can run on ``weight`` (CPU, built and loaded; see ``miaotui.kernels``)."""
    if weight.device.type != "cpu":
        return False
    from miaotui import kernels as native

    return native.available()


def native_faster(key: tuple, native_fn: Callable[[torch.Tensor], object],
                  torch_fn: Callable[[torch.Tensor], object], in_features: int, cold: bool = False) -> bool:
    """Whether the native kernel beats PyTorch's packed one on a one-row input (True if PyTorch's refuses
    the shape, or the cores are contended); cached by ``key``. ``cold``: timed from cold caches, as decode
    reads a model's weights when they do not fit in cache (hot, fp32 576 x 1536 on this VM: 63 vs 70 us,
    a coin toss that once left SmolLM2's down projections on MKL). On AVX2-only CPUs the native kernels
    win by 1.5-2x; PyTorch's are built for AVX-512 and can win there."""
    if key not in _crossover:
        if cpu_contended():
            return True
        with torch.inference_mode():
            x = torch.randn(1, in_features)
            try:
                t_torch = _time(lambda: torch_fn(x), cold=cold)
            except RuntimeError:
                t_torch = float("inf")
            _crossover[key] = int(_time(lambda: native_fn(x), cold=cold) <= t_torch)
    return bool(_crossover[key])


def int8pack_supported() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def int4pack_supported() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def fbgemm_linear_supported() -> bool:
    """FBGEMM's int8 linear with fp32 output (x86 builds of PyTorch)."""
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
        torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32")
