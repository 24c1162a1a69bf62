"""One engine, one process: ``python -m miaotui.bench.worker SPEC`` prints one JSON line.

A process per engine keeps their thread pools, allocators and compile caches apart, and makes the
peak RSS of each engine its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path


def make_engine(spec: str, model: str | None, threads: int, compile: bool):
    kind, _, dtype = spec.partition(":")
    if kind == "miaotui":
        from miaotui.bench.engines import MiaotuiEngine

        return MiaotuiEngine(model, dtype or "fp32", compile)
    if kind == "hf":
        from miaotui.bench.engines import HFEngine

        return HFEngine(model, dtype or "fp32")
    if kind == "llama.cpp":
        from miaotui.bench.llamacpp import LlamaCppEngine

        if dtype == "f32":  # the same weights as miaotui's fp32 engine: an F32 copy of the GGUF file
            from miaotui.bench.gguf_f32 import f32_gguf
            from miaotui.defaults import default_model_path

            model = str(f32_gguf(model or default_model_path()))
        elif dtype:
            raise ValueError(f"unknown llama.cpp variant {spec!r} (llama.cpp: the file as is; llama.cpp:f32)")
        return LlamaCppEngine(model, threads)
    raise ValueError(f"unknown engine {spec!r}")


def peak_rss_bytes() -> int:
    """This process's peak RSS. Linux keeps ``ru_maxrss`` across exec (it would report the parent's
    peak); VmHWM belongs to the new address space, so it is the engine's own."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # other OSes: no exec carry-over issue


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("spec")
    p.add_argument("--model")
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--prompts", required=True, help="JSON made by the orchestrator: token ids per length, prefill lengths, decode prompt length")
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--concurrency", default="", help="comma-separated request counts for throughput ('' = none)")
    args = p.parse_args(argv)

    if not args.spec.startswith("llama.cpp"):  # keep torch out of a peer's process (and its RSS)
        import torch

        torch.set_num_threads(args.threads)
    from miaotui.bench.latency import measure_latency

    spec = json.loads(Path(args.prompts).read_text())
    prompts = {int(n): ids for n, ids in spec["prompts"].items()}
    t0 = time.perf_counter()
    engine = make_engine(args.spec, args.model, args.threads, args.compile)
    load_s = time.perf_counter() - t0
    result = measure_latency(
        engine, prompts.__getitem__, prefill_lengths=tuple(spec["prefill"]), decode_prompt=spec["decode_prompt"], decode_tokens=args.decode_tokens, repeats=args.repeats,
        progress=lambda s: print(f"  {engine.name}: {s}", file=sys.stderr, flush=True),
    )
    if args.concurrency:
        from miaotui.bench.throughput import measure_throughput

        try:
            result["throughput_tok_s"] = measure_throughput(
                engine, prompts.__getitem__, [int(n) for n in args.concurrency.split(",")], args.repeats,
                progress=lambda s: print(f"  {engine.name}: {s}", file=sys.stderr, flush=True))
        except NotImplementedError as e:
            result["throughput_skipped"] = str(e)
    result.update(spec=args.spec, load_s=load_s, threads=args.threads,
                  peak_rss_bytes=peak_rss_bytes())
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
