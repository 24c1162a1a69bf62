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


def make_engine(spec: str, model: str | None, threads: int, compile: bool):
    kind, _, dtype = spec.partition(":")
    if kind == "miaotui":
        from miaotui.bench.engines import MiaotuiEngine

        return MiaotuiEngine(model, dtype or "fp32", compile)
    if kind == "hf":
        from miaotui.bench.engines import HFEngine

        return HFEngine(model, dtype or "fp32")
    if kind == "llama.cpp":
        from miaotui.bench.engines import LlamaCppEngine

        return LlamaCppEngine(model, threads)
    raise ValueError(f"unknown engine {spec!r}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("spec")
    p.add_argument("--model")
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--data")
    p.add_argument("--prefill", default="128,512,2048")
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from miaotui.bench.latency import measure_latency
    from miaotui.bench.prompts import prompt_ids
    from miaotui.loading import default_model_path
    from miaotui.loading.gguf_tokenizer import load_gguf_tokenizer
    from miaotui.loading.tokenizer import load_hf_tokenizer

    t0 = time.perf_counter()
    engine = make_engine(args.spec, args.model, args.threads, args.compile)
    load_s = time.perf_counter() - t0
    path = args.model or default_model_path()
    from pathlib import Path

    tok = load_hf_tokenizer(Path(path)) if Path(path).is_dir() else load_gguf_tokenizer(path)
    result = measure_latency(
        engine, lambda n: prompt_ids(tok, n, args.data),
        prefill_lengths=tuple(int(x) for x in args.prefill.split(",")),
        decode_tokens=args.decode_tokens, repeats=args.repeats,
        progress=lambda s: print(f"  {engine.name}: {s}", file=sys.stderr, flush=True),
    )
    result.update(spec=args.spec, load_s=load_s, threads=args.threads,
                  peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
