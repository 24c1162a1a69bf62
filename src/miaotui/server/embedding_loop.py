"""The engine thread of an encoder server: every ``/v1/embeddings`` request's inputs are batched together.

The asyncio side calls ``submit(ids, types)`` and awaits the returned future; the thread takes everything
that arrived while the previous forward ran (up to ``max_batch_inputs`` inputs), runs it as one call of
``Encoder.embed`` (length-sorted, packed batches of ``batch_size``), and hands each request its rows with
``call_soon_threadsafe``. A failing forward fails the requests in it, not the loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np

from miaotui.server.engine_loop import LoopDead, QueueFull
from miaotui.server.metrics import Metrics

log = logging.getLogger("miaotui.server")


class EmbeddingFailed(Exception):
    """The forward pass that held this request failed."""


@dataclass
class _Job:
    ids: list[list[int]]
    types: list[list[int]]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    arrival: float


class EmbeddingLoop:
    def __init__(self, encoder, metrics: Metrics, batch_size: int = 32, max_queue_inputs: int = 4096,
                 max_batch_inputs: int = 256):
        self.encoder, self.metrics = encoder, metrics
        self.batch_size, self.max_batch_inputs = batch_size, max_batch_inputs
        self.capacity = max_queue_inputs  # inputs waiting or running; beyond that: 429
        self.dead = False
        self._inbox: list[_Job] = []
        self._queued = 0  # inputs submitted and not yet answered; guarded by _cond
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="miaotui-embed", daemon=True)

    def start(self) -> EmbeddingLoop:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return not self.dead and self._thread.is_alive()

    # ---- called from the event loop
    def submit(self, ids: list[list[int]], types: list[list[int]]) -> asyncio.Future:
        """Queue one request's inputs; the future resolves to their (B, dim) float32 embeddings."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cond:
            if self.dead or self._stop:
                raise LoopDead()
            if self._queued + len(ids) > self.capacity:
                raise QueueFull()
            self._queued += len(ids)
            self._inbox.append(_Job(ids, types, future, loop, time.monotonic()))
            self._cond.notify()
        return future

    # ---- the engine thread
    def _take(self) -> list[_Job]:
        """Whole requests, oldest first, up to ``max_batch_inputs`` inputs (always at least one request)."""
        jobs, n = [], 0
        while self._inbox and (not jobs or n + len(self._inbox[0].ids) <= self.max_batch_inputs):
            job = self._inbox.pop(0)
            jobs.append(job)
            n += len(job.ids)
        return jobs

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._inbox and not self._stop:
                    self._cond.wait()
                if self._stop:
                    break
                jobs = self._take()
                self.metrics.set_queue(sum(len(j.ids) for j in jobs), sum(len(j.ids) for j in self._inbox))
            self._forward(jobs)
        with self._cond:
            left, self._inbox = self._inbox, []
        for job in left:  # shutting down: whatever is left ends with an error
            _resolve(job, error=LoopDead("the server is shutting down"))

    def _forward(self, jobs: list[_Job]) -> None:
        ids = [x for j in jobs for x in j.ids]
        types = [x for j in jobs for x in j.types]
        try:
            emb = self.encoder.embed(ids, types, batch_size=self.batch_size).numpy().astype(np.float32)
        except Exception as e:  # noqa: BLE001 (one failed batch must not stop the loop)
            log.exception("embedding %d inputs failed", len(ids))
            emb, error = None, EmbeddingFailed(f"{type(e).__name__}: {e}")
        now = time.monotonic()
        start = 0
        for job in jobs:
            n = len(job.ids)
            if emb is not None:
                _resolve(job, result=emb[start:start + n])
            else:
                _resolve(job, error=error)
            start += n
            self.metrics.prompt_tokens.inc(sum(map(len, job.ids)))
            self.metrics.e2e.observe(now - job.arrival)
        with self._cond:
            self._queued -= len(ids)
            self.metrics.set_queue(0, sum(len(j.ids) for j in self._inbox))


def _resolve(job: _Job, result=None, error: Exception | None = None) -> None:
    def settle():
        if job.future.done():  # the request gave up (timeout, client gone)
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)

    try:
        job.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the event loop is closed (shutdown): nobody is listening any more
        pass
