"""The native kernels must build wherever they can: every test of them skips when the build fails, so
without this check a compile error in ``kernels/csrc`` would pass CI as a silently slower run."""

from __future__ import annotations

import shutil

import pytest

from miaotui import kernels
from miaotui.kernels.build import choose_isa


def test_kernels_build_where_a_compiler_and_avx2_exist():
    isa, why = choose_isa()
    if isa is None or not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip(f"no native build expected here ({why or 'no C++ compiler'})")
    assert kernels.available(), "the native kernels failed to build on a machine that can (see the log line above)"
