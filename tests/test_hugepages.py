"""Weights on 2 MB pages: ``import miaotui`` turns on PyTorch's transparent-huge-page allocator (when it comes
before torch), and the kernel then backs a large tensor with huge pages where THP is not disabled."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")

PROBE = """
import miaotui, os, torch
x = torch.ones(64 << 18)  # 64 MB, written: faulted in
x.add_(1)
huge = [l for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages")]
print(os.environ.get("THP_MEM_ALLOC_ENABLE"), int(huge[0].split()[1]) if huge else -1)
"""


def _probe(env: dict[str, str]) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    setting, kb = out.stdout.split()
    return setting, int(kb)


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux /proc")
def test_import_enables_huge_page_allocations():
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    setting, kb = _probe(env)
    assert setting == "1"
    if THP.exists() and "[never]" not in THP.read_text():
        assert kb >= 32 * 1024, f"only {kb} kB on huge pages after a 64 MB tensor"
    setting, kb_off = _probe({**env, "THP_MEM_ALLOC_ENABLE": "0"})  # a user's explicit choice is kept
    assert setting == "0"
    if THP.exists() and "[madvise]" in THP.read_text():  # huge pages only where asked for
        assert kb_off < 32 * 1024
