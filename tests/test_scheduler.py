"""Continuous batching with a fake runner: budgets, chunked prefill, preemption, aborts, exact block accounting.

The fake "model" picks the next token as a hash of the whole history, and reads that history back out of a
simulated paged KV cache through the block tables the scheduler hands out. A wrong table, a lost block, a
write into a shared block or a botched recompute after preemption therefore changes the outputs, which
must equal a plain one-request-at-a-time loop.
"""

from __future__ import annotations

import random

import pytest

from miaotui.config import SamplingParams
from miaotui.engine.engine_config import CacheConfig, EngineConfig
from miaotui.engine.request import Request, RequestStatus
from miaotui.engine.scheduler import Scheduler, SchedulerOutput
from miaotui.errors import MiaotuiError, PromptTooLongError

VOCAB, EOS = 64, 0


def next_token(history: list[int]) -> int:
    h = 17
    for t in history:
        h = (h * 1_000_003 + t) & 0xFFFF_FFFF
    return (h >> 7) % VOCAB


def reference(req: Request, max_model_len: int) -> tuple[list[int], str]:
    """What an unbatched loop with unlimited memory produces."""
    history, out, p = list(req.prompt_token_ids), [], req.sampling_params
    while True:
        t = next_token(history)
        if t in req.eos_token_ids and not p.ignore_eos:
            return out, "stop"
        history.append(t)
        out.append(t)
        if len(out) >= p.max_tokens or len(history) >= max_model_len:
            return out, "length"


class PagedFakeModel:
    def __init__(self, sched: Scheduler):
        self.sched = sched
        self.kv: dict[int, tuple[int, int]] = {}  # cache slot → (position, token id) written there

    def __call__(self, out: SchedulerOutput) -> dict[str, list[int]]:
        bs, bm = out.block_size, self.sched.block_manager
        for s in out.scheduled:  # write every new token's "K/V" first, like a batched forward
            # aborted since schedule(): its blocks are free, but nobody gets them before the next schedule()
            live = self.sched.get_request(s.request_id) is not None
            for pos, slot, tok in zip(s.positions, s.slot_mapping(bs), s.token_ids):
                block = slot // bs
                assert bm.ref_count(block) == 1 or not live, "writing into a shared block"
                assert not (bm.prefix_cache and bm.prefix_cache.is_cached(block)), "writing into a cached block"
                self.kv[slot] = (pos, tok)
        sampled = {}
        for s in out.scheduled:
            if s.sample:
                history = []
                for p in range(s.context_len):
                    pos, tok = self.kv[s.block_table[p // bs] * bs + p % bs]
                    assert pos == p
                    history.append(tok)
                sampled[s.request_id] = [next_token(history)]
        return sampled


def make(num_blocks: int = 256, block_size: int = 4, max_num_seqs: int = 8, budget: int = 64,
         max_model_len: int = 512, prefix: bool = True) -> Scheduler:
    cache = CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=prefix)
    return Scheduler(EngineConfig(max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                                  max_num_batched_tokens=budget, cache=cache))


def req(rid: str, prompt: list[int], max_tokens: int = 16, ignore_eos: bool = False) -> Request:
    return Request(rid, prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=ignore_eos),
                   eos_token_ids=frozenset({EOS}))


def run(sched: Scheduler, arrivals: dict[int, list[Request]], aborts: dict[int, list[str]] | None = None,
        max_steps: int = 5000) -> tuple[dict[str, tuple[list[int], str]], list[SchedulerOutput]]:
    """Drive the scheduler to completion, checking limits and invariants after every step."""
    model, cfg = PagedFakeModel(sched), sched.config
    streamed: dict[str, list[int]] = {}
    results: dict[str, tuple[list[int], str]] = {}
    outs: list[SchedulerOutput] = []
    aborts = aborts or {}
    for step in range(max_steps):
        for r in arrivals.get(step, []):
            sched.add_request(r)
        for rid in aborts.get(step, []):
            if sched.abort(rid):
                results[rid] = (streamed.get(rid, []), "abort")
        if not sched.has_unfinished() and step > max(arrivals, default=0):
            break
        out = sched.schedule()
        outs.append(out)
        assert out.num_batched_tokens <= cfg.max_num_batched_tokens
        assert len(out.scheduled) <= cfg.max_num_seqs
        assert len({s.request_id for s in out.scheduled}) == len(out.scheduled)
        for o in sched.update(out, model(out)):
            streamed.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                results[o.request_id] = (streamed[o.request_id], o.finish_reason)
        sched.check_invariants()
    else:
        raise AssertionError("did not finish: deadlock or livelock")
    bm = sched.block_manager
    assert bm.num_free_blocks == bm.num_blocks  # every block came back
    bm.check([])
    return results, outs


def prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, VOCAB) for _ in range(n)]


def test_requests_join_and_leave_between_steps_with_reference_outputs():
    rng = random.Random(0)
    arrivals = {step: [req(f"r{step}-{k}", prompt(rng, rng.randint(1, 30)), rng.randint(1, 20))
                       for k in range(rng.randint(0, 2))] for step in range(0, 40, 3)}
    sched = make()
    results, outs = run(sched, arrivals)
    every = [r for rs in arrivals.values() for r in rs]
    assert {r.request_id: reference(r, 512) for r in every} == results
    assert any(reason == "stop" for _, reason in results.values())  # EOS happened at least once
    assert sum(bool(o.finished_request_ids) for o in outs) > 1  # they left at different times


def test_max_num_seqs_caps_the_batch():
    rng = random.Random(1)
    sched = make(max_num_seqs=3)
    reqs = [req(f"r{i}", prompt(rng, 5), 6, ignore_eos=True) for i in range(7)]
    results, outs = run(sched, {0: reqs})
    assert [s.request_id for s in outs[0].scheduled] == ["r0", "r1", "r2"]
    assert max(len(o.scheduled) for o in outs) == 3
    assert results == {r.request_id: reference(r, 512) for r in reqs}


def test_chunked_prefill_never_stalls_running_decodes():
    rng = random.Random(2)
    sched = make(budget=16, max_num_seqs=4)
    model = PagedFakeModel(sched)
    for rid in ("a", "b"):
        sched.add_request(req(rid, prompt(rng, 3), 40, ignore_eos=True))
    out = sched.schedule()
    sched.update(out, model(out))  # a and b now decode
    long = req("long", prompt(rng, 100), 3)
    sched.add_request(long)
    positions = []
    while True:
        out = sched.schedule()
        by_id = {s.request_id: s for s in out.scheduled}
        assert by_id["a"].num_tokens == 1 and by_id["b"].num_tokens == 1  # decodes progress every step
        chunk = by_id["long"]
        assert chunk.num_tokens <= 14 and out.num_batched_tokens <= 16
        positions.extend(chunk.positions)
        sampled = model(out)
        assert ("long" in sampled) == (chunk.context_len == 100)  # an unfinished prompt samples nothing
        sched.update(out, sampled)
        sched.check_invariants()
        if chunk.sample:
            break
    assert positions == list(range(100)) and len(long.output_token_ids) == 1


def test_a_long_chunk_leaves_one_token_of_budget_per_decode_behind_it():
    sched = make(budget=4, max_num_seqs=4)
    for rid in "abc":
        sched.add_request(req(rid, [5], 20, ignore_eos=True))
    out = sched.schedule()
    sched.update(out, {"a": list(range(1, 11)), "b": [1], "c": [1]})  # a got 10 tokens at once
    out = sched.schedule()
    assert [(s.request_id, s.num_tokens, s.sample) for s in out.scheduled] == [
        ("a", 2, False), ("b", 1, True), ("c", 1, True)]
    sched.update(out, {"b": [2], "c": [2]})


@pytest.mark.parametrize("prefix", [True, False])
def test_preemption_under_memory_pressure_gives_the_same_outputs(prefix: bool):
    rng = random.Random(3)
    reqs = [req(f"r{i}", prompt(rng, rng.randint(5, 20)), rng.randint(10, 25), ignore_eos=True)
            for i in range(8)]
    # 12 blocks × 4 slots = 48 tokens, while one request alone may need up to 44
    sched = make(num_blocks=12, budget=32, prefix=prefix)
    results, outs = run(sched, {0: [Request(r.request_id, r.prompt_token_ids, r.sampling_params,
                                            r.eos_token_ids) for r in reqs]})
    assert sum(len(o.preempted_request_ids) for o in outs) > 0
    ample, _ = run(make(num_blocks=1024, budget=32, prefix=prefix), {0: reqs})
    assert results == ample == {r.request_id: reference(r, 512) for r in reqs}


def test_the_newest_running_request_is_preempted_first():
    sched = make(num_blocks=6, block_size=4, budget=64)
    model = PagedFakeModel(sched)
    for i in range(3):
        sched.add_request(req(f"r{i}", [1 + i] * 8, 12, ignore_eos=True))  # 2 blocks each: cache full
    out = sched.schedule()
    sched.update(out, model(out))
    out = sched.schedule()  # each needs a third block at position 8
    assert out.preempted_request_ids == ["r2"]
    assert [s.request_id for s in out.scheduled] == ["r0", "r1"]
    assert sched.get_request("r2").status is RequestStatus.PREEMPTED and list(sched.waiting)[0].request_id == "r2"
    sched.update(out, model(out))


def test_a_request_filling_the_whole_cache_fits_and_completes():
    sched = make(num_blocks=4, block_size=4, max_model_len=100)
    # 16 slots hold 8 prompt + 9 new tokens: the last new token never needs a slot
    results, _ = run(sched, {0: [req("full", list(range(1, 9)), 9, ignore_eos=True)]})
    assert len(results["full"][0]) == 9
    with pytest.raises(PromptTooLongError, match="KV blocks"):
        sched.add_request(req("over", list(range(1, 9)), 10, ignore_eos=True))


def test_requests_that_can_never_run_are_refused_at_add_time():
    sched = make(max_model_len=16)
    with pytest.raises(PromptTooLongError, match="context"):
        sched.add_request(req("long", list(range(16))))
    with pytest.raises(MiaotuiError, match="empty"):
        sched.add_request(req("empty", []))
    sched.add_request(req("a", [1]))
    with pytest.raises(MiaotuiError, match="already in use"):
        sched.add_request(req("a", [1]))
    assert sched.num_waiting == 1


def test_finish_reasons():
    sched = make(max_model_len=12)
    scripted = {"eos": [5, EOS], "ignore": [5, EOS, 6], "max": [1, 2, 3, 4], "ctx": [1, 2, 3, 4]}
    sched.add_request(req("eos", [1, 2], 10))
    sched.add_request(req("ignore", [1, 2], 3, ignore_eos=True))
    sched.add_request(req("max", [1, 2], 3))
    sched.add_request(req("ctx", list(range(1, 11)), 10))  # 10 + 2 = max_model_len
    got: dict[str, tuple[list[int], str]] = {}
    while sched.has_unfinished():
        out = sched.schedule()
        sampled = {s.request_id: [scripted[s.request_id].pop(0)] for s in out.scheduled if s.sample}
        for o in sched.update(out, sampled):
            got.setdefault(o.request_id, ([], ""))[0].extend(o.new_token_ids)
            if o.finished:
                got[o.request_id] = (got[o.request_id][0], o.finish_reason)
    assert got == {"eos": ([5], "stop"), "ignore": ([5, EOS, 6], "length"), "max": ([1, 2, 3], "length"),
                   "ctx": ([1, 2], "length")}
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def test_several_tokens_per_step_are_appended_and_computed_next():
    sched = make()
    sched.add_request(req("r", [1, 2, 3], 10))
    out = sched.schedule()
    [o] = sched.update(out, {"r": [4, 5, 6]})  # e.g. accepted speculative tokens
    assert o.new_token_ids == [4, 5, 6]
    out = sched.schedule()
    assert out.scheduled[0].token_ids == [4, 5, 6] and out.scheduled[0].start_pos == 3
    sched.update(out, {"r": [7]})


def test_abort_frees_everything_wherever_the_request_is():
    sched = make(max_num_seqs=2)
    model = PagedFakeModel(sched)
    for rid in ("run", "mid", "wait"):
        sched.add_request(req(rid, list(range(1, 30)), 20, ignore_eos=True))
    out = sched.schedule()
    sched.update(out, model(out))
    assert sched.abort("wait") and not sched.abort("wait") and not sched.abort("nope")
    out = sched.schedule()
    assert sched.abort("mid")  # between schedule() and update(): its step result is dropped
    outputs = sched.update(out, model(out))
    assert [o.request_id for o in outputs] == ["run"]
    sched.check_invariants()
    assert sched.abort("run")
    assert not sched.has_unfinished()
    assert set(sched.schedule().finished_request_ids) == {"mid", "run"}
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks
    sched.block_manager.check([])


def test_schedule_and_update_alternate():
    sched = make()
    assert sched.schedule().is_empty  # nothing to do: no update needed
    sched.add_request(req("r", [1, 2], 4))
    out = sched.schedule()
    with pytest.raises(RuntimeError):
        sched.schedule()
    with pytest.raises(ValueError, match="no sampled token"):
        sched.update(out, {})
    with pytest.raises(RuntimeError):
        sched.update(out, {"r": [3]})  # already consumed


@pytest.mark.parametrize("seed", range(6))
def test_random_workload_keeps_invariants(seed: int):
    rng = random.Random(seed)
    systems = [prompt(rng, rng.randint(4, 24)) for _ in range(3)]  # shared prefixes for the cache
    reqs, arrivals = [], {}
    for i in range(30):
        p = rng.choice(systems) + prompt(rng, rng.randint(1, 12)) if rng.random() < 0.7 else prompt(rng, 20)
        r = req(f"r{i}", p, rng.randint(1, 30), ignore_eos=rng.random() < 0.3)
        reqs.append(r)
        arrivals.setdefault(rng.randrange(40), []).append(r)
    aborts = {rng.randrange(60): [f"r{rng.randrange(30)}"] for _ in range(5)}
    block_size = rng.choice([2, 4, 8])
    fit = -(-65 // block_size)  # the longest request (36 prompt + 30 new) alone
    sched = make(num_blocks=rng.randint(fit, 2 * fit), block_size=block_size,
                 max_num_seqs=rng.randint(1, 6), budget=rng.choice([8, 16, 48]),
                 prefix=rng.random() < 0.7)
    results, outs = run(sched, arrivals, aborts)
    assert set(results) == {r.request_id for r in reqs}
    for r in reqs:
        tokens, reason = results[r.request_id]
        want, want_reason = reference(r, 512)
        if reason == "abort":
            assert tokens == want[:len(tokens)]
        else:
            assert (tokens, reason) == (want, want_reason)
