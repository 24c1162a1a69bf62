"""Batch-1 decode tok/s with miaotui's native GEMV kernels vs PyTorch's, in one process, runs interleaved.

    python benchmarks/decode_native.py /tmp/k-int8 /tmp/k-int4 default            # fp32 default model too
    python benchmarks/decode_native.py default:bf16 --compile --tokens 64 --threads 2

Each model is loaded twice and prepared once with the native kernels (``MIAOTUI_NATIVE=1``) and once
without (``MIAOTUI_NATIVE=0``: PyTorch's packed kernels / MKL); then both decode the same prompt in
alternation, so load from other processes on the machine hits both alike. Decode tok/s is
``(N - n) / (t(N) - t(n))`` from an n-token and an N-token run after the same 128-token prefill, the
median of --repeats. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from miaotui.kernels import ENV


def prepared(spec: str, native: bool, compile_: bool):
    from miaotui.engine.prepare import prepare_for_inference
    from miaotui.engine.runner import Runner
    from miaotui.loading import load

    path, _, dtype = spec.partition(":")
    old = os.environ.get(ENV)
    os.environ[ENV] = (old if old not in (None, "0") else "1") if native else "0"  # keep e.g. "avx2"
    try:
        model = prepare_for_inference(load(None if path == "default" else path, dtype or "fp32").model)
    finally:
        os.environ.pop(ENV) if old is None else os.environ.__setitem__(ENV, old)
    model.setup_cache(batch=1, max_seq_len=512)
    return Runner(model, compile=compile_)


def decode_seconds(runner, prompt: torch.Tensor, n: int) -> float:
    with torch.no_grad():
        token = runner.prefill(prompt).argmax(-1, keepdim=True)
        t = time.perf_counter()
        for pos in range(prompt.shape[1], prompt.shape[1] + n):
            token = runner.decode(token, pos).argmax(-1, keepdim=True)
        return time.perf_counter() - t


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="checkpoint folders or 'default', each optionally ':fp32' or ':bf16'")
    p.add_argument("--tokens", type=int, default=48, help="decode tokens per timed run (default: 48)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side; the median is kept (default: 3)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: PyTorch's default)")
    p.add_argument("--compile", action="store_true", help="compile the decode step (as `miaotui bench` does)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    prompt = torch.randint(100, 1000, (1, 128), generator=torch.Generator().manual_seed(0))
    rows = []
    for spec in a.models:
        runners = {"torch": prepared(spec, False, a.compile), "native": prepared(spec, True, a.compile)}
        for r in runners.values():  # warm-up (and compile)
            decode_seconds(r, prompt, 4)
        tok_s: dict[str, list[float]] = {k: [] for k in runners}
        for _ in range(a.repeats):
            for name, r in runners.items():
                short, long = decode_seconds(r, prompt, 8), decode_seconds(r, prompt, 8 + a.tokens)
                tok_s[name].append(a.tokens / (long - short))
        row = {"model": spec, **{f"{k}_tok_s": round(statistics.median(v), 1) for k, v in tok_s.items()}}
        row["speedup"] = round(row["native_tok_s"] / row["torch_tok_s"], 2)
        rows.append(row)
        print(f"{spec:<28} torch {row['torch_tok_s']:>7.1f} tok/s   native {row['native_tok_s']:>7.1f} tok/s   "
              f"{row['speedup']:.2f}x", flush=True)
    print(json.dumps({"threads": torch.get_num_threads(), "compiled": a.compile, "results": rows}))


if __name__ == "__main__":
    main()
