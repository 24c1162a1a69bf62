"""``miaotui bench --tp 1,2``: one model at several tensor-parallel sizes on this machine, honestly.

Every size gets the same cores: TP=1 is one process with all of them as threads, TP=N is N torchrun ranks
with cores/N threads each. Each run is its own process tree; rank 0 measures with the same latency code as
the engine benchmark (prefill tok/s per prompt length, batch-1 greedy decode tok/s, medians after warm-up),
every rank reports the weight bytes it holds, and a collective micro-benchmark gives what one all-reduce
costs here, so the table can say how much of a decode step is communication.

Both sizes run eager: the TP leader's broadcast hook and the collectives do not compile into one graph.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import torch

DECODE_PROMPT = 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- the parent: launch each size, report

def run_tp(args: argparse.Namespace) -> int:
    """Launch one run per TP size, print a table and end with one JSON line."""
    from miaotui.errors import MiaotuiError
    from miaotui.parallel.tp import UNEVEN_ENV

    try:
        sizes = [int(n) for n in str(args.tp).split(",") if n.strip()]
    except ValueError:
        raise MiaotuiError(f"--tp wants comma-separated rank counts, got {args.tp!r}") from None
    cores = args.threads or os.cpu_count() or 1
    results = []
    for n in sizes:
        threads = max(1, cores // n)
        worker = ["-m", "miaotui.bench.tp", "--threads", str(threads), "--prefill", args.prefill,
                  "--decode-tokens", str(args.decode_tokens), "--repeats", str(args.repeats)]
        worker += ["--model", args.model] if args.model else []
        worker += ["--data", args.data] if args.data else []
        if n == 1:  # a plain process: no process group, no hooks; the baseline TP must beat
            cmd = [sys.executable, *worker]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
                   "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *worker]
        print(f"[bench] TP={n}, {threads} thread(s) per rank ...", file=sys.stderr, flush=True)
        # models whose heads do not divide (SmolLM2-135M: 9 query, 3 KV heads) deal KV groups unevenly;
        # the result's heads_per_rank says how they were split
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        env.setdefault(UNEVEN_ENV, "1")
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            print(f"[bench] TP={n} failed (exit {proc.returncode}); see its output above", file=sys.stderr)
            continue
        results.append(json.loads(lines[-1]))
    if not getattr(args, "json", False):
        print(table(results))
    print(json.dumps({"tp": results, "cores": cores, "torch": torch.__version__}))
    return 0 if results else 1


def table(results: list[dict]) -> str:
    if not results:
        return "(no results)"
    lengths = list(results[0]["prefill_tok_s"])
    base = results[0]
    head = ["TP", "threads/rank", "decode tok/s", *[f"prefill {n} tok/s" for n in lengths],
            "weights/rank MB", "q/KV heads per rank", "all-reduce µs", "comm/token ms (est.)"]
    rows = []
    for r in results:
        ratio = r["decode_tok_s"] / base["decode_tok_s"]
        rows.append([str(r["tp"]), str(r["threads_per_rank"]), f"{r['decode_tok_s']:.1f} ({ratio:.2f}×)",
                     *[f"{r['prefill_tok_s'][n]:.0f}" for n in lengths],
                     " / ".join(f"{b / 1e6:.1f}" for b in r["weight_bytes_per_rank"]),
                     " / ".join(f"{q}/{kv}" for q, kv in r["heads_per_rank"]),
                     f"{r['allreduce_us']:.0f}" if r["allreduce_us"] else "—",
                     f"{r['comm_ms_per_token']:.2f}" if r["comm_ms_per_token"] else "—"])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)])


# ---------------------------------------------------------------- one run (every rank of it)

def _collective_us(hidden: int, vocab_slice: int, repeats: int = 200) -> tuple[float, float]:
    """Median µs of one decode-sized all-reduce (1, 1, hidden) and logits all-gather (1, 1, V/W), fp32."""
    import torch.distributed as dist

    x = torch.zeros(1, 1, hidden)
    parts = [torch.zeros(1, 1, vocab_slice) for _ in range(dist.get_world_size())]
    local = torch.zeros(1, 1, vocab_slice)

    def median_us(fn, n):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e6

    for _ in range(20):  # warm the connections
        dist.all_reduce(x)
    gather_us = median_us(lambda: dist.all_gather(parts, local), repeats // 4)
    return median_us(lambda: dist.all_reduce(x), repeats), gather_us


def main(argv: list[str] | None = None) -> int:
    import torch.distributed as dist

    from miaotui.engine.prepare import prepare_for_inference
    from miaotui.parallel import dist as mdist
    from miaotui.parallel import launch, weight_bytes
    from miaotui.parallel.worker import TPWorkerLoop

    p = argparse.ArgumentParser(prog="python -m miaotui.bench.tp")
    p.add_argument("--model")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prefill", default="128,512")
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    tp, follower = launch.tp_active(), launch.is_follower()
    if follower:  # the same preparation as rank 0, then (below) replay its forwards
        llm, model = None, launch.load_sharded(a.model).model
        prepare_for_inference(model)
    else:
        from miaotui.llm import LLM

        llm = launch.lead(a.model) if tp else LLM(a.model)
        model = llm.loaded.model
    attn = model.attention_layers()[0]
    mine = (weight_bytes(model), getattr(attn, "n_heads", None), model.kv_shape()[0])  # bytes, q and KV heads
    per_rank, allreduce_us, gather_us = [mine], 0.0, 0.0
    if tp:  # direct collectives, before rank 0 starts driving forwards
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, mine)
        hidden = model.lm_head.in_features
        allreduce_us, gather_us = _collective_us(hidden, model.lm_head.inner.out_features)
        if follower:
            TPWorkerLoop(model).run()
            mdist.destroy()
            return 0
    result = _measure(llm, a)
    n_layers = len(model.attention_layers())
    # per decode token: 2 all-reduces per layer + the embedding's, one logits all-gather, two small broadcasts
    comm = ((2 * n_layers + 1 + 2) * allreduce_us + gather_us) / 1e3 if tp else 0.0
    result.update(tp=mdist.world_size(), threads_per_rank=a.threads,
                  weight_bytes_per_rank=[r[0] for r in per_rank], heads_per_rank=[list(r[1:]) for r in per_rank],
                  allreduce_us=allreduce_us, allgather_logits_us=gather_us, comm_ms_per_token=comm)
    print(json.dumps(result), flush=True)
    return 0


def _measure(llm, a: argparse.Namespace) -> dict:
    """Rank 0 (or the lone process): the engine benchmark's latency measurement on this LLM."""
    from miaotui.bench.engines import MiaotuiEngine, decode_bytes
    from miaotui.bench.latency import measure_latency
    from miaotui.bench.prompts import prompt_ids

    engine = MiaotuiEngine.__new__(MiaotuiEngine)  # its timing methods, on the model already loaded here
    engine.loaded, engine.runner = llm.loaded, llm.runner
    engine.name, engine.weight_bytes = "miaotui fp32", decode_bytes(llm.loaded.model)
    lengths = [int(n) for n in a.prefill.split(",")]
    cache: dict[int, list[int]] = {}

    def prompt(n: int) -> list[int]:
        if n not in cache:
            cache[n] = prompt_ids(llm.tokenizer, n, a.data)
        return cache[n]

    r = measure_latency(engine, prompt, lengths, DECODE_PROMPT, a.decode_tokens, a.repeats)
    return {"decode_tok_s": r["decode_tok_s"], "prefill_tok_s": r["prefill_tok_s"], "ttft_s": r["ttft_s"]}


if __name__ == "__main__":
    sys.exit(main())
