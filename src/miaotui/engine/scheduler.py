"""Continuous batching: which requests join the next forward pass, on which tokens, and in which KV blocks.

One step = ``schedule()`` → the runner computes the listed tokens and samples where asked → ``update()``.
Every request is treated alike: it needs K/V for ``num_tokens - num_computed_tokens`` tokens (the whole
prompt when new, 1 when decoding, everything again after a preemption). Policy per step:

1. Running requests, oldest first. A decode gets its 1 token; an unfinished prompt gets the largest chunk
   that still leaves 1 token of the budget for every decode behind it, so long prompts never stall decodes.
   When blocks run out, the newest running request is preempted (blocks freed, recomputed later).
2. Waiting requests, first come first served, while budget, ``max_num_seqs`` and blocks allow, and only
   when nothing was preempted this step (admitting while evicting would thrash).

A request that could never fit the cache alone is refused in ``add_request``; any other one eventually
runs: the oldest running request is never preempted for a newer one, so it always makes progress.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from miaotui.config import SamplingParams
from miaotui.engine.block_manager import BlockManager
from miaotui.engine.engine_config import EngineConfig
from miaotui.engine.request import Request, RequestOutput, RequestStatus
from miaotui.errors import MiaotuiError, PromptTooLongError


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's share of a step: run ``token_ids`` at positions ``start_pos, start_pos+1, ...``.

    Attention for these tokens covers positions ``[0, context_len)``, whose K/V live in ``block_table``
    (position ``p`` is slot ``p % block_size`` of block ``block_table[p // block_size]``); the K/V of the new
    tokens are written to their slots first. When ``sample`` is set, the runner samples one token from the
    logits of the last position; a prompt chunk that does not reach the end samples nothing.
    """

    request_id: str
    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    sample: bool
    sampling_params: SamplingParams

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def context_len(self) -> int:
        return self.start_pos + len(self.token_ids)

    @property
    def positions(self) -> range:
        return range(self.start_pos, self.context_len)

    def slot_mapping(self, block_size: int) -> list[int]:
        """Flat cache slot (block * block_size + offset) where each new token's K/V is written."""
        return [self.block_table[p // block_size] * block_size + p % block_size for p in self.positions]


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    block_size: int
    # requests that lost their blocks this step; they come back later as a prefill from position 0
    preempted_request_ids: list[str] = field(default_factory=list)
    # finished or aborted since the previous step: the runner may drop any per-request state it keeps
    finished_request_ids: list[str] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.block_manager = BlockManager(config.cache)
        self.waiting: deque[Request] = deque()
        # admission order, which is arrival order (FCFS, preempted ones rejoin at the front of `waiting`):
        # the newest request is last, so preemption victims are popped from the end
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}  # every unfinished request
        self._finished_ids: list[str] = []
        self._pending: SchedulerOutput | None = None

    # ---- requests in and out
    def add_request(self, req: Request) -> None:
        """Queue a fresh request; refuse one that could never run, with the reason."""
        n = req.num_prompt_tokens
        if n == 0:
            raise MiaotuiError(f"request {req.request_id!r}: empty prompt; give at least one token")
        if req.request_id in self.requests:
            raise MiaotuiError(f"request id {req.request_id!r} is already in use")
        if req.status is not RequestStatus.WAITING or req.output_token_ids or req.block_ids:
            raise MiaotuiError(f"request {req.request_id!r} was already scheduled once")
        max_len = self.config.max_model_len
        if n >= max_len:
            raise PromptTooLongError(f"request {req.request_id!r}: prompt is {n} tokens but the context is "
                                     f"{max_len} (at least one position must remain for the answer)")
        # the last new token is returned, never fed back, so it needs no KV slot
        max_new = min(req.sampling_params.max_tokens, max_len - n)
        need = self.block_manager.blocks_for(n + max_new - 1)
        if need > self.block_manager.num_blocks:
            cache = self.config.cache
            raise PromptTooLongError(
                f"request {req.request_id!r}: {n} prompt + {max_new} new tokens need {need} KV blocks but the "
                f"cache has {cache.num_blocks} ({cache.num_slots} tokens); lower max_tokens or grow the cache")
        self.waiting.append(req)
        self.requests[req.request_id] = req

    def abort(self, request_id: str) -> bool:
        """Cancel a request wherever it is and free its blocks. False if it is unknown or already done.

        May come between ``schedule()`` and ``update()`` (same thread): freed blocks are handed out again only
        by the next ``schedule()``, and ``update()`` ignores what the runner computed for the aborted request.
        """
        req = self.requests.get(request_id)
        if req is None:
            return False
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        req.finish(RequestStatus.FINISHED_ABORTED)
        self._release(req)
        return True

    def get_request(self, request_id: str) -> Request | None:
        return self.requests.get(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ---- one step
    def schedule(self) -> SchedulerOutput:
        if self._pending is not None and self._pending.scheduled:
            raise RuntimeError("update() must receive the previous schedule()'s output first")
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []
        budget = self._schedule_running(budget, scheduled, preempted)
        if not preempted:
            self._schedule_waiting(budget, scheduled)
        out = SchedulerOutput(scheduled, self.config.cache.block_size, preempted, self._finished_ids)
        self._finished_ids = []
        self._pending = out
        return out

    def _schedule_running(self, budget: int, scheduled: list[ScheduledRequest], preempted: list[str]) -> int:
        decodes_behind = sum(1 for r in self.running if r.num_uncomputed_tokens == 1)
        i = 0
        while i < len(self.running):  # the list shrinks from the end as victims are preempted
            req = self.running[i]
            if req.num_uncomputed_tokens == 1:
                decodes_behind -= 1
            n = min(req.num_uncomputed_tokens, budget - decodes_behind)
            if n <= 0:  # a prompt chunk waits; the budget left is promised to the decodes behind it
                i += 1
                continue
            while not self.block_manager.allocate(req, n):
                victim = self.running.pop()  # the newest; it is `req` itself when req is the newest
                if victim is not req and victim.num_uncomputed_tokens == 1:
                    decodes_behind -= 1
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            else:
                scheduled.append(self._entry(req, n))
                budget -= n
                i += 1
        return budget

    def _schedule_waiting(self, budget: int, scheduled: list[ScheduledRequest]) -> None:
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            cached = bm.match_prefix(req)
            n = min(req.num_tokens - len(cached) * bm.block_size, budget)
            if not bm.allocate(req, n, cached):
                break  # first come first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            if req.status is RequestStatus.WAITING:
                req.num_cached_tokens = req.num_computed_tokens
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            scheduled.append(self._entry(req, n))
            budget -= n

    def _entry(self, req: Request, n: int) -> ScheduledRequest:
        start = req.num_computed_tokens
        return ScheduledRequest(req.request_id, req.token_ids_slice(start, start + n), start,
                                list(req.block_ids), start + n == req.num_tokens, req.sampling_params)

    def _preempt(self, req: Request) -> None:
        self.block_manager.free(req)
        req.num_computed_tokens = 0  # recompute from scratch (the prefix cache may give some back)
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.waiting.appendleft(req)  # victims go newest first, so the queue stays in arrival order

    def update(self, out: SchedulerOutput, sampled: Mapping[str, Sequence[int]]) -> list[RequestOutput]:
        """Record that ``out`` ran. ``sampled`` maps each request with ``sample`` set to its new token(s).

        Returns an output for every request that sampled this step (finished ones included). Requests
        aborted between ``schedule()`` and ``update()`` are skipped, whatever the runner returned for them.
        """
        if out is not self._pending:
            raise RuntimeError("update() takes the output of the latest schedule(), once")
        self._pending = None
        results: list[RequestOutput] = []
        for s in out.scheduled:
            req = self.requests.get(s.request_id)
            if req is None or req.status is not RequestStatus.RUNNING or req.num_computed_tokens != s.start_pos:
                continue
            req.num_computed_tokens += s.num_tokens
            self.block_manager.cache_computed_blocks(req)
            if not s.sample:
                continue
            tokens = sampled.get(s.request_id)
            if not tokens:
                raise ValueError(f"no sampled token for request {s.request_id!r}, which was due to sample")
            results.append(RequestOutput(req.request_id, self._append(req, tokens), req.is_finished,
                                         req.finish_reason))
        if any(r.finished for r in results):
            self.running = [r for r in self.running if not r.is_finished]
            for r in results:
                if r.finished:
                    self._release(self.requests[r.request_id])
        return results

    def _append(self, req: Request, tokens: Sequence[int]) -> list[int]:
        """Append sampled tokens up to the first stop condition; EOS itself is not appended."""
        params = req.sampling_params
        eos = frozenset() if params.ignore_eos else req.eos_token_ids
        new: list[int] = []
        for tok in tokens:
            if tok in eos:
                req.finish(RequestStatus.FINISHED_STOPPED)
                break
            req.output_token_ids.append(tok)
            new.append(tok)
            if req.num_output_tokens >= params.max_tokens or req.num_tokens >= self.config.max_model_len:
                req.finish(RequestStatus.FINISHED_LENGTH)
                break
        return new

    def _release(self, req: Request) -> None:
        self.block_manager.free(req)
        del self.requests[req.request_id]
        self._finished_ids.append(req.request_id)

    # ---- debugging
    def check_invariants(self) -> None:
        """Assert the bookkeeping is consistent (tests call it every step; O(requests + blocks))."""
        bm = self.block_manager
        bm.check(r.block_ids for r in self.running)
        assert len(self.running) <= self.config.max_num_seqs
        assert {r.request_id for r in [*self.waiting, *self.running]} == set(self.requests)
        assert len(self.waiting) + len(self.running) == len(self.requests), "a request is queued twice"
        for r in self.waiting:
            assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED), r.status
            assert not r.block_ids and r.num_computed_tokens == 0
        for r in self.running:
            assert r.status is RequestStatus.RUNNING
            assert bm.blocks_for(r.num_computed_tokens) <= len(r.block_ids) <= bm.blocks_for(r.num_tokens)
            assert r.num_tokens <= self.config.max_model_len
