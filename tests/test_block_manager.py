"""Paged KV bookkeeping alone: on-demand growth, all-or-nothing allocation, exact free accounting."""

from __future__ import annotations

import pytest

from miaotui.engine.block_manager import BlockManager
from miaotui.engine.engine_config import CacheConfig, EngineConfig
from miaotui.engine.request import Request
from miaotui.errors import MiaotuiError


def manager(num_blocks: int = 8, block_size: int = 4, prefix: bool = False) -> BlockManager:
    return BlockManager(CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=prefix))


def request(n: int, rid: str = "r") -> Request:
    return Request(rid, list(range(100, 100 + n)))


def test_blocks_grow_on_demand_as_tokens_are_appended():
    m, r = manager(), request(20)
    assert m.allocate(r, 3) and len(r.block_ids) == 1 and m.num_free_blocks == 7
    r.num_computed_tokens = 3
    assert m.allocate(r, 1) and len(r.block_ids) == 1  # position 3 still fits block 0
    r.num_computed_tokens = 4
    assert m.allocate(r, 1) and len(r.block_ids) == 2  # position 4 opens block 1
    r.num_computed_tokens = 5
    assert m.allocate(r, 6) and len(r.block_ids) == 3  # up to position 10
    assert len(set(r.block_ids)) == 3 and m.num_free_blocks == 5 and m.num_used_blocks == 3
    assert all(m.ref_count(b) == 1 for b in r.block_ids)
    m.check([r.block_ids])
    m.free(r)
    assert r.block_ids == [] and m.num_free_blocks == 8
    m.check([])


def test_allocation_is_all_or_nothing():
    m = manager(num_blocks=4)
    a, b = request(12, "a"), request(8, "b")
    assert m.allocate(a, 12) and m.num_free_blocks == 1
    assert not m.can_allocate(b, 8)
    assert not m.allocate(b, 8)
    assert b.block_ids == [] and m.num_free_blocks == 1  # nothing half-taken
    assert m.can_allocate(b, 4) and m.allocate(b, 4) and m.num_free_blocks == 0
    b.num_computed_tokens = 3
    assert m.allocate(b, 1)  # position 3 still fits b's block...
    b.num_computed_tokens = 4
    assert not m.allocate(b, 1)  # ...but position 4 needs a fifth block
    m.check([a.block_ids, b.block_ids])
    m.free(a)
    m.free(b)
    assert m.num_free_blocks == 4


def test_blocks_are_never_handed_out_twice():
    m = manager(num_blocks=6, block_size=2)
    reqs = [request(4, f"r{i}") for i in range(3)]
    for r in reqs:
        assert m.allocate(r, 4)
    ids = [b for r in reqs for b in r.block_ids]
    assert sorted(ids) == list(range(6))
    m.free(reqs[1])
    c = request(4, "c")
    assert m.allocate(c, 4) and set(c.block_ids) == set(ids[2:4])  # reuses exactly the freed ones
    m.check([reqs[0].block_ids, reqs[2].block_ids, c.block_ids])


def test_double_free_is_caught():
    m, r = manager(), request(8)
    m.allocate(r, 8)
    stale = list(r.block_ids)
    m.free(r)
    m.free(r)  # the table was cleared: freeing a finished request again is a no-op
    assert m.num_free_blocks == 8
    r.block_ids = stale  # a stale copy of the table would free blocks twice
    with pytest.raises(RuntimeError, match="double free"):
        m.free(r)


def test_cached_blocks_only_start_an_empty_table():
    m, r = manager(prefix=True), request(8)
    m.allocate(r, 4)
    with pytest.raises(ValueError):
        m.allocate(r, 4, cached_blocks=[3])


def test_without_prefix_caching_nothing_is_kept():
    m, r = manager(), request(8)
    m.allocate(r, 8)
    r.num_computed_tokens = 8
    m.cache_computed_blocks(r)  # a no-op when disabled
    m.free(r)
    assert m.prefix_cache is None and m.match_prefix(request(8, "again")) == []
    assert m.num_free_blocks == 8


def test_config_validation():
    with pytest.raises(MiaotuiError):
        CacheConfig(block_size=0)
    with pytest.raises(MiaotuiError):
        EngineConfig(max_num_seqs=8, max_num_batched_tokens=4)  # a decode could starve
    assert CacheConfig(block_size=16, num_blocks=4).num_slots == 64


def test_unresolved_block_count_is_a_clear_error():
    with pytest.raises(MiaotuiError, match="num_blocks is not resolved"):
        BlockManager(CacheConfig())
