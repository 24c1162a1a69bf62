"""Prometheus metrics of one server, in its own registry (two apps in one process never share counters)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.process_collector import ProcessCollector

# seconds; TTFT and end-to-end on a CPU range from milliseconds (tiny models) to minutes (long prompts, queueing)
_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
_PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes etc.: the soak's RSS check reads it
        self.requests = Counter("miaotui_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        self.ttft = Histogram("miaotui_time_to_first_token_seconds", "arrival → first generated token",
                              buckets=_LATENCY, registry=r)
        self.tpot = Histogram("miaotui_time_per_output_token_seconds",
                              "(last token - first token) / (tokens - 1), per sequence", buckets=_PER_TOKEN, registry=r)
        self.e2e = Histogram("miaotui_e2e_request_latency_seconds", "arrival → last token, per sequence",
                             buckets=_LATENCY, registry=r)
        self.running = Gauge("miaotui_num_requests_running", "sequences in the batch", registry=r)
        self.waiting = Gauge("miaotui_num_requests_waiting", "sequences queued for the batch", registry=r)
        self.prompt_tokens = Counter("miaotui_prompt_tokens", "prompt tokens of admitted sequences", registry=r)
        self.generation_tokens = Counter("miaotui_generation_tokens", "tokens generated", registry=r)
        self.aborted = Counter("miaotui_requests_aborted", "sequences aborted (client gone or timed out)",
                               registry=r)

    def set_queue(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    def render(self) -> bytes:
        return generate_latest(self.registry)
