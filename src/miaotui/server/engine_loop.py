"""The one engine thread: every HTTP request's sequences go into one ``LLMEngine``, batched by its scheduler.

The asyncio side calls ``submit`` (→ an ``asyncio.Queue`` of ``Event``s for that HTTP request) and ``abort``;
both only append to an inbox, so the event loop never waits for a forward pass. The thread drains the inbox
between steps, steps, turns tokens into text (``TextAssembler``: UTF-8-safe, stop strings) and hands each
sequence's delta to its queue with ``call_soon_threadsafe``. A stop string aborts the sequence at once, which
frees its KV blocks for the next step.

Failures stay as small as they can: a bad request fails alone (error event); an exception in one sequence's
text handling fails that sequence; an exception in a batched forward fails the sequences in flight and the
engine is rebuilt; only when even that fails is the loop dead (``/health`` answers 503).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from miaotui.config import SamplingParams
from miaotui.engine.text import TextAssembler
from miaotui.errors import MiaotuiError
from miaotui.server.logits import OpenAIExtras, ServerEngine, TokenLogprob
from miaotui.server.metrics import Metrics

log = logging.getLogger("miaotui.server")


class QueueFull(Exception):
    """More sequences than running + waiting slots: the caller answers 429."""


class LoopDead(Exception):
    """The engine could not be (re)built: nothing can run."""


@dataclass
class SeqSpec:
    """One sequence to generate: a choice of an HTTP request."""

    seq_id: str
    index: int  # the choice index in the response
    prompt_ids: list[int]
    params: SamplingParams
    extras: OpenAIExtras = field(default_factory=OpenAIExtras)


@dataclass
class Event:
    """New output of one sequence. ``finish_reason`` set → its last event; ``error`` set → it failed."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    error: tuple[int, str] | None = None  # (HTTP status, message)
    prompt_tokens: int = 0


@dataclass
class _Live:
    spec: SeqSpec
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    text: TextAssembler
    arrival: float
    first: float | None = None
    n_out: int = 0


def new_assembler(tokenizer, spec: SeqSpec) -> TextAssembler:
    """Module-level so a test can make one sequence's text handling fail."""
    return TextAssembler(tokenizer, spec.prompt_ids, spec.params.stop)


class EngineLoop:
    def __init__(self, make_engine: Callable[[], ServerEngine], tokenizer, metrics: Metrics, max_queue: int):
        self.make_engine, self.tokenizer, self.metrics = make_engine, tokenizer, metrics
        self.engine = make_engine()
        self.capacity = self.engine.config.max_num_seqs + max_queue  # running + waiting sequences
        self.dead = False
        self._inbox: list[tuple[str, object]] = []
        self._cond = threading.Condition()
        self._live: dict[str, _Live] = {}
        self._inflight = 0  # sequences submitted and not yet finished; guarded by _cond
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="miaotui-engine", daemon=True)

    def start(self) -> EngineLoop:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout)

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def alive(self) -> bool:
        return not self.dead and self._thread.is_alive()

    # ---- called from the event loop
    def submit(self, specs: list[SeqSpec]) -> asyncio.Queue:
        """Queue the sequences of one HTTP request; raises ``QueueFull`` or ``LoopDead``."""
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        with self._cond:
            if self.dead:
                raise LoopDead()
            if self._inflight + len(specs) > self.capacity:
                raise QueueFull()
            self._inflight += len(specs)
            now = time.monotonic()
            for spec in specs:
                self._inbox.append(("add", (spec, queue, loop, now)))
            self._cond.notify()
        return queue

    def abort(self, seq_ids: list[str]) -> None:
        with self._cond:
            self._inbox.extend(("abort", sid) for sid in seq_ids)
            self._cond.notify()

    # ---- the engine thread
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._inbox and not self._live and not self._stop:
                    self._cond.wait()
                if self._stop:
                    break
                commands, self._inbox = self._inbox, []
            for kind, arg in commands:
                if kind == "add":
                    self._add(*arg)
                else:
                    self._abort(arg)
            if self._live:
                self._step()
            self.metrics.set_queue(self.engine.scheduler.num_running, self.engine.scheduler.num_waiting)
        for sid in list(self._live):  # shutting down: whatever is left ends with an error
            self._fail(sid, 503, "the server is shutting down")

    def _add(self, spec: SeqSpec, queue: asyncio.Queue, loop, arrival: float) -> None:
        live = None
        try:
            live = _Live(spec, queue, loop, new_assembler(self.tokenizer, spec), arrival)
            self.engine.add_request(spec.seq_id, spec.prompt_ids, spec.params, spec.extras)
        except MiaotuiError as e:  # e.g. does not fit the cache: the edge checks most of this first
            self._finish_unregistered(queue, loop, Event(spec.index, error=(400, str(e))))
            return
        except Exception as e:  # noqa: BLE001 (one request's failure must not stop the loop)
            log.exception("adding request %s failed", spec.seq_id)
            self._finish_unregistered(queue, loop, Event(spec.index, error=(500, f"{type(e).__name__}: {e}")))
            return
        self._live[spec.seq_id] = live
        self.metrics.prompt_tokens.inc(len(spec.prompt_ids))

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # noqa: BLE001 (a batched forward failed: fail what is in it, start over)
            log.exception("engine step failed; failing %d sequences and rebuilding the engine", len(self._live))
            for sid in list(self._live):
                self._fail(sid, 500, f"engine step failed: {type(e).__name__}: {e}")
            try:
                self.engine = self.make_engine()
            except Exception:  # noqa: BLE001
                log.exception("rebuilding the engine failed: the server is dead")
                with self._cond:
                    self.dead = True
            return
        now = time.monotonic()
        for o in outputs:
            live = self._live.get(o.request_id)
            if live is None:
                continue
            try:
                self._deliver(live, o, now)
            except Exception as e:  # noqa: BLE001 (one sequence's text handling failed: it alone fails)
                log.exception("sequence %s failed", o.request_id)
                self._fail(o.request_id, 500, f"{type(e).__name__}: {e}")

    def _deliver(self, live: _Live, o, now: float) -> None:
        sid = live.spec.seq_id
        logprobs = self.engine.pop_logprobs(sid)
        pieces, finish = [], None
        for tok in o.new_token_ids:
            if live.first is None:
                live.first = now
                self.metrics.ttft.observe(now - live.arrival)
            live.n_out += 1
            text, stopped = live.text.add(tok)
            pieces.append(text)
            if stopped:
                self.engine.abort(sid)  # frees its blocks before the next step
                finish = "stop"
                break
        if finish is None and o.finished:
            text, stopped = live.text.finish()
            pieces.append(text)
            finish = "stop" if stopped else o.finish_reason
        self.metrics.generation_tokens.inc(len(o.new_token_ids))
        event = Event(live.spec.index, "".join(pieces), list(o.new_token_ids), logprobs, finish,
                      prompt_tokens=len(live.spec.prompt_ids))
        if finish is not None:
            self._done(sid, now)
        self._put(live, event)

    def _abort(self, sid: str) -> None:
        live = self._live.get(sid)
        if live is None:
            return
        self.engine.abort(sid)
        self.metrics.aborted.inc()
        self._done(sid, time.monotonic())
        self._put(live, Event(live.spec.index, finish_reason="abort"))

    def _fail(self, sid: str, status: int, message: str) -> None:
        live = self._live.get(sid)
        if live is None:
            return
        try:
            self.engine.abort(sid)
        except Exception:  # noqa: BLE001 (the engine may be the broken part)
            pass
        self._done(sid, time.monotonic())
        self._put(live, Event(live.spec.index, error=(status, message)))

    def _done(self, sid: str, now: float) -> None:
        live = self._live.pop(sid)
        with self._cond:
            self._inflight -= 1
        self.metrics.e2e.observe(now - live.arrival)
        if live.first is not None and live.n_out > 1:
            self.metrics.tpot.observe((now - live.first) / (live.n_out - 1))

    def _finish_unregistered(self, queue, loop, event: Event) -> None:
        with self._cond:
            self._inflight -= 1
        _put_threadsafe(loop, queue, event)

    @staticmethod
    def _put(live: _Live, event: Event) -> None:
        _put_threadsafe(live.loop, live.queue, event)


def _put_threadsafe(loop, queue: asyncio.Queue, event: Event) -> None:
    try:
        loop.call_soon_threadsafe(queue.put_nowait, event)
    except RuntimeError:  # the event loop is closed (shutdown): nobody is listening any more
        pass
