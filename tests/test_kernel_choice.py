"""Kernel choice by measurement (compress/quant/kernels.py): while another process keeps the cores busy,
timings are not trusted: the default rules decide, and nothing is cached for a later, quiet prepare."""

from __future__ import annotations

import pytest
import torch

from miaotui import kernels
from miaotui.compress.quant import kernels as choice
from miaotui.kernels.linear import DEFAULT_ROW_PLAN, GemvLinear, use_native_gemv

pytestmark = pytest.mark.skipif(not kernels.available(), reason="native kernels do not build on this machine")


@pytest.fixture
def contended(monkeypatch):
    """A probe that always reads as contended (any time exceeds 0 s): the real probe runs, its verdict is forced."""
    monkeypatch.setattr(choice, "CONTENDED_S", 0.0)
    monkeypatch.setattr(choice, "_probe", {"at": float("-inf"), "seconds": 0.0, "warned": 0.0})
    monkeypatch.setattr(choice, "_crossover", {})
    monkeypatch.setattr(choice, "_plans", {})
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)


def never(x: torch.Tensor) -> torch.Tensor:
    raise AssertionError("timed while the cores were contended")


def test_probe_of_idle_cores_reads_quiet(monkeypatch):
    monkeypatch.setattr(choice, "_probe", {"at": float("-inf"), "seconds": 0.0, "warned": 0.0})
    monkeypatch.setattr(choice, "CONTENDED_S", float("inf"))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # with one thread there is nothing to probe
    assert not choice.cpu_contended()
    assert 0 < choice._probe["seconds"] < 1.0  # it did time the GEMV


def test_contended_cores_give_the_defaults_uncached(contended, caplog):
    with caplog.at_level("WARNING", logger="miaotui.kernels"):
        assert choice.cpu_contended()
    assert "another process is using this machine's cores" in caplog.text
    assert choice.native_faster(("k",), never, never, 16) is True
    assert choice.packed_rows_limit(("p",), never, never, 16, assume=4) == 4
    assert choice.fastest_by_rows(("r",), {"a": never}, 16, (8, 16, 64), default={8: "a", 16: "b", 128: "c"}) == \
        {8: "a", 16: "b"}
    assert choice._crossover == {} and choice._plans == {}  # a quiet prepare later measures


def test_contended_prepare_still_swaps_linears_with_the_default_plan(contended):
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Linear(48, 32)).requires_grad_(False)
    assert use_native_gemv(model) == 2
    gemv = max(n for n, k in DEFAULT_ROW_PLAN.items() if k == "gemv")
    gemm = max(n for n, k in DEFAULT_ROW_PLAN.items() if k == "gemm")
    for lin in model:
        assert type(lin) is GemvLinear and (lin.gemv_rows, lin.gemm_rows) == (gemv, gemm)
    x = torch.randn(20, 64)
    torch.testing.assert_close(model(x), x @ model[0].weight.t() @ model[1].weight.t()
                               + model[0].bias @ model[1].weight.t() + model[1].bias, atol=1e-5, rtol=1e-5)


def test_cold_timing_flushes_the_caches_before_every_timed_call(monkeypatch):
    """A row plan is timed as a decode step meets its weights: from memory, not from the cache the previous
    call filled (the flush is a write of twice the last-level cache between calls)."""
    events = []
    real_fill = torch.Tensor.fill_

    def fill(t, value):
        if t.numel() * 4 >= choice.flush_bytes():
            events.append("flush")
        return real_fill(t, value)

    monkeypatch.setattr(choice, "_plans", {})
    monkeypatch.setattr(choice, "cpu_contended", lambda: False)
    monkeypatch.setattr(torch.Tensor, "fill_", fill)
    plan = choice.fastest_by_rows(("cold-test",), {"a": lambda x: events.append("a")}, 8, (4,), cold=True)
    assert plan == {4: "a"}
    assert events == ["a"] + ["flush", "a"] * 5  # a warm-up, then each timed call after a flush
    events.clear()
    choice.fastest_by_rows(("hot-test",), {"a": lambda x: events.append("a")}, 8, (4,))
    assert events == ["a"] * 6


@pytest.mark.parametrize("cache,cold", [(0, True), (1 << 40, False)])
def test_weights_that_overflow_the_cache_are_timed_cold(monkeypatch, cache, cold):
    """A model whose weights fit in the last-level cache meets them hot at every step, a larger one cold."""
    seen = []
    real = choice.fastest_by_rows
    monkeypatch.setattr(choice, "cache_bytes", lambda: cache)
    monkeypatch.setattr(choice, "cpu_contended", lambda: False)
    monkeypatch.setattr(choice, "native_faster", lambda *a, **k: seen.append(("gate", k["cold"])) or True)
    monkeypatch.setattr(choice, "fastest_by_rows", lambda *a, **k: seen.append(("rows", k["cold"])) or real(*a, **k))
    monkeypatch.setattr(choice, "_plans", {})
    use_native_gemv(torch.nn.Sequential(torch.nn.Linear(64, 48)).requires_grad_(False))
    assert seen == [("gate", cold), ("rows", cold)]


def test_a_handicapped_candidate_must_win_by_its_margin(monkeypatch):
    import time

    monkeypatch.setattr(choice, "cpu_contended", lambda: False)
    monkeypatch.setattr(choice, "_plans", {})
    fast, slow = (lambda x: time.sleep(0.004)), (lambda x: time.sleep(0.005))
    assert choice.fastest_by_rows(("h1",), {"own": fast, "gemm": slow}, 8, (8,)) == {8: "own"}
    assert choice.fastest_by_rows(("h2",), {"own": fast, "gemm": slow}, 8, (8,), handicap={"own": 1.5}) == \
        {8: "gemm"}
