"""What this CPU can do fast: bf16 is only a speed-up with native bf16 dot products (AVX512-BF16 or AMX)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

_FEATURES = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")


@cache
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_features() -> list[str]:
    """The SIMD features that matter for inference, as present on this CPU (Linux; [] elsewhere)."""
    flags = cpu_flags()
    return [f for f in _FEATURES if f in flags]


def has_native_bf16() -> bool | None:
    """True/False on Linux x86; None when we cannot tell (another OS or architecture)."""
    flags = cpu_flags()
    if not flags or "avx2" not in flags:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16"})
