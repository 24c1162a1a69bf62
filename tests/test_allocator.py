"""``import miaotui``'s allocator settings (allocator.py): weights on 2 MB pages (PyTorch's transparent-huge-page
allocator, when miaotui comes before torch), and freed activations reused from the heap instead of unmapped and
page-faulted in again."""

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


REUSE_PROBE = """
import miaotui, resource, torch
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(3):  # a 64 MB activation, written and freed, as each batch of a forward does
    f0 = faults()
    x = torch.empty(16 << 20)
    x.fill_(1)
    del x
print(faults() - f0)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_activations_are_reused_without_page_faults():
    env = {k: v for k, v in os.environ.items() if k != "MIAOTUI_MALLOC_KEEP"}
    run = lambda e: int(subprocess.run([sys.executable, "-c", REUSE_PROBE], env=e, capture_output=True,  # noqa: E731
                                       text=True, check=True).stdout)
    kept, off = run(env), run({**env, "MIAOTUI_MALLOC_KEEP": "0"})
    # 64 MB is 32 faults on 2 MB pages, 16384 on 4 KB ones: glibc unmaps a freed block that large by default
    assert off >= 32, off
    assert kept < 8, (kept, off)
