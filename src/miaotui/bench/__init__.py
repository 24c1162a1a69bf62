"""Benchmarks: latency (prefill, TTFT, decode) of miaotui and its peers, each in its own process."""
