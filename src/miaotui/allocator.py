"""Process-wide memory-allocator settings that inference speed depends on; applied by ``import miaotui``.

- Weights on 2 MB pages: decode streams every weight from memory per token; on 2 MB pages (PyTorch's
  allocator madvises blocks of 2 MB and more when ``THP_MEM_ALLOC_ENABLE=1``) the hardware prefetchers are not
  stopped at every 4 KB page boundary and TLB misses drop: fp32 decode +8 % (median of 7 process pairs), GEMV
  bandwidth +4-8 % in one process. PyTorch reads it at its first allocation, so it only takes effect when
  miaotui is imported before torch (the CLI always is); an explicit setting, e.g. 0, is kept.
- Freed activations reused, not unmapped: glibc serves blocks above its mmap threshold (a few MB) with a
  fresh mmap and unmaps them on free, so every large activation tensor of a many-row forward (an encoder
  batch, a prefill) is page-faulted in again. Raising the mmap and trim thresholds keeps freed blocks in the
  heap for the next batch: all-MiniLM-L6-v2, 100 paragraphs, 2 threads: the bias copies of the linears
  200 -> 66 ms, GELU 340 -> 160-210 ms (profiler, two runs each). ``MIAOTUI_MALLOC_KEEP=0`` turns it off.
  Reuse is not guaranteed: a small block allocated after a freed one stops it merging back, and PyTorch's
  2 MB-aligned allocations need 2 MB more than their size, so a freed hole of the same size may not fit and
  the heap grows instead (seen in a test that pins such blocks: 8 batches of 64 MB, 537 MB of heap).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

KEEP_ENV = "MIAOTUI_MALLOC_KEEP"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
KEEP_BYTES = 1 << 30  # blocks up to 1 GiB come from (and return to) the heap; the heap shrinks past 1 GiB free


def _glibc():
    """glibc, when it is the allocator this process uses; None otherwise (musl, or a malloc such as jemalloc
    preloaded in front of it, on which glibc's mallopt would change nothing)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        used = ctypes.CDLL(None)  # the process's own symbol lookup: what `malloc` resolves to
        libc.mallopt  # noqa: B018  (musl and other libcs have none: nothing to tune)
    except (OSError, AttributeError):
        return None
    addr = lambda f: ctypes.cast(f, ctypes.c_void_p).value  # noqa: E731
    return libc if addr(used.malloc) == addr(libc.malloc) else None


def setup() -> bool:
    """Apply both settings; True when glibc is the allocator and accepted the thresholds."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if os.environ.get(KEEP_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES))
