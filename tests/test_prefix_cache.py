"""Prefix caching: chained block hashes, sharing with ref counts, LRU eviction, and the scheduler using it."""

from __future__ import annotations

from miaotui.config import SamplingParams
from miaotui.engine.block_manager import BlockManager
from miaotui.engine.engine_config import CacheConfig, EngineConfig
from miaotui.engine.prefix_cache import PrefixCache, extend_block_hashes, hash_block
from miaotui.engine.request import Request
from miaotui.engine.scheduler import Scheduler, SchedulerOutput

BS = 4


def hashes(tokens: list[int], bs: int = BS) -> list[bytes]:
    out: list[bytes] = []
    extend_block_hashes(out, tokens, bs)
    return out


def computed(m: BlockManager, rid: str, tokens: list[int]) -> Request:
    """A request whose whole token list was allocated, computed and registered in the cache."""
    r = Request(rid, tokens)
    assert m.allocate(r, len(tokens), m.match_prefix(r) or ())
    r.num_computed_tokens = len(tokens)
    m.cache_computed_blocks(r)
    return r


# ---- hashing
def test_equal_hashes_mean_equal_whole_prefixes():
    a = hashes([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert len(a) == 2  # the partial third block is never hashed
    assert a == hashes([1, 2, 3, 4, 5, 6, 7, 8])
    b = hashes([0, 2, 3, 4, 5, 6, 7, 8])  # same second block, different first
    assert a[0] != b[0] and a[1] != b[1]  # the chain carries the whole prefix
    assert hash_block(None, [5, 6, 7, 8]) != a[1]  # same tokens at another position
    incremental: list[bytes] = []
    extend_block_hashes(incremental, [1, 2, 3, 4, 5], BS)
    extend_block_hashes(incremental, [1, 2, 3, 4, 5, 6, 7, 8, 9], BS, num_blocks=1)  # capped: no change
    assert incremental == a[:1]
    extend_block_hashes(incremental, [1, 2, 3, 4, 5, 6, 7, 8, 9], BS)
    assert incremental == a


def test_lookup_stops_at_the_first_miss_and_eviction_is_lru():
    c = PrefixCache()
    h = hashes(list(range(12)))
    assert c.insert(10, h[0]) and c.insert(12, h[2])
    assert not c.insert(11, h[0])  # a second block with the same prefix is not cached
    assert c.lookup(h) == [10]  # block 2 is useless without block 1
    assert c.park(10) and c.park(12) and not c.park(99)
    c.unpark(10)  # hit again while parked
    assert c.num_evictable == 1 and c.evict() == 12 and c.lookup(h[2:]) == []
    c.park(10)
    assert c.evict() == 10 and len(c) == 0


# ---- block manager with the cache
def test_shared_prefix_blocks_are_ref_counted():
    m = BlockManager(CacheConfig(block_size=BS, num_blocks=8))
    a = computed(m, "a", list(range(10)))  # blocks 0,1 full and cached; block 2 partial
    b = Request("b", list(range(8)) + [77, 78])
    hit = m.match_prefix(b)
    assert hit == a.block_ids[:2]
    assert m.allocate(b, 2, hit)
    assert b.num_computed_tokens == 8 and b.block_ids[:2] == a.block_ids[:2] and len(b.block_ids) == 3
    assert [m.ref_count(x) for x in b.block_ids] == [2, 2, 1]
    assert m.num_used_blocks == 4
    m.check([a.block_ids, b.block_ids])
    m.free(a)
    assert [m.ref_count(x) for x in b.block_ids] == [1, 1, 1]
    m.free(b)
    # everything is allocatable again, yet the two full blocks stay cached
    assert m.num_free_blocks == 8 and m.prefix_cache.num_evictable == 2
    m.check([])


def test_the_last_prompt_token_is_always_computed():
    m = BlockManager(CacheConfig(block_size=BS, num_blocks=8))
    computed(m, "a", list(range(8)))  # exactly two full blocks
    again = Request("again", list(range(8)))
    hit = m.match_prefix(again)
    assert len(hit) == 1  # block 1 would leave nothing to run for logits
    assert m.allocate(again, 4, hit) and again.num_computed_tokens == 4


def test_unreferenced_cached_blocks_are_evicted_lru_when_the_free_list_runs_out():
    m = BlockManager(CacheConfig(block_size=BS, num_blocks=4))
    a = computed(m, "a", list(range(8)))
    b = computed(m, "b", list(range(50, 58)))
    a_blocks = list(a.block_ids)
    m.free(a)  # released first → evicted first; its tail before its head
    m.free(b)
    assert m.num_free_blocks == 4 and m.prefix_cache.num_evictable == 4
    c = Request("c", [9, 9, 9])
    assert m.allocate(c, 3)
    assert c.block_ids == [a_blocks[1]]  # a's tail block was reused
    assert len(m.match_prefix(Request("a2", list(range(9))))) == 1  # a's head survives
    assert len(m.match_prefix(Request("b2", list(range(50, 59))))) == 2  # b untouched
    assert m.num_free_blocks == 3
    m.check([c.block_ids])


def test_a_hit_on_an_evictable_block_counts_against_free_space():
    m = BlockManager(CacheConfig(block_size=BS, num_blocks=3))
    a = computed(m, "a", list(range(8)))
    m.free(a)
    b = Request("b", list(range(8)) + [1, 2, 3, 4, 5])  # shares 2 blocks, needs 2 more: 4 > 3
    hit = m.match_prefix(b)
    assert len(hit) == 2 and not m.can_allocate(b, 5, hit)
    assert not m.allocate(b, 5, hit) and m.num_free_blocks == 3
    assert m.allocate(b, 1, hit)  # 2 revived + 1 new fits
    m.check([b.block_ids])


# ---- through the scheduler
def step(s: Scheduler, token: int = 7) -> SchedulerOutput:
    out = s.schedule()
    s.update(out, {x.request_id: [token] for x in out.scheduled if x.sample})
    s.check_invariants()
    return out


SYSTEM = list(range(1, 33))  # a 32-token system prompt: 8 full blocks


def engine(prefix: bool) -> Scheduler:
    cache = CacheConfig(block_size=BS, num_blocks=64, enable_prefix_caching=prefix)
    return Scheduler(EngineConfig(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64, cache=cache))


def test_second_request_with_the_same_system_prompt_computes_only_its_suffix():
    s = engine(prefix=True)
    params = SamplingParams(max_tokens=4, temperature=0)
    s.add_request(Request("a", SYSTEM + [40, 41, 42], params))
    first = step(s)
    assert first.scheduled[0].num_tokens == 35
    s.add_request(Request("b", SYSTEM + [50, 51], params))
    out = step(s)
    b = next(x for x in out.scheduled if x.request_id == "b")
    assert b.start_pos == 32 and b.token_ids == [50, 51] and b.sample
    a_table = s.get_request("a").block_ids
    assert b.block_table[:8] == a_table[:8]
    assert all(s.block_manager.ref_count(x) == 2 for x in a_table[:8])
    assert s.get_request("b").num_cached_tokens == 32
    while s.has_unfinished():
        step(s)
    assert s.block_manager.num_free_blocks == 64


def test_disabled_prefix_caching_recomputes_everything():
    s = engine(prefix=False)
    params = SamplingParams(max_tokens=4, temperature=0)
    s.add_request(Request("a", SYSTEM + [40], params))
    step(s)
    s.add_request(Request("b", SYSTEM + [50], params))
    out = step(s)
    b = next(x for x in out.scheduled if x.request_id == "b")
    assert b.start_pos == 0 and b.num_tokens == 33
    assert not set(b.block_table) & set(s.get_request("a").block_ids)


def test_finished_requests_leave_their_prefix_for_later_ones():
    s = engine(prefix=True)
    params = SamplingParams(max_tokens=1, temperature=0)
    s.add_request(Request("a", SYSTEM + [40], params))
    step(s)
    assert not s.has_unfinished() and s.block_manager.num_free_blocks == 64
    s.add_request(Request("b", SYSTEM + [50], params))
    out = step(s)
    assert out.scheduled[0].start_pos == 32 and out.scheduled[0].num_tokens == 1
    assert s.block_manager.reset_prefix_cache() == 8 and len(s.block_manager.prefix_cache) == 0
