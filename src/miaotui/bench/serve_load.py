"""``miaotui bench serve --url URL``: load a running OpenAI-compatible server (ours or any other) and report
TTFT, time per output token, inter-token latency and end-to-end latency (p50/p90/p99), throughput and failures
per concurrency level. Ends with one JSON line.

Closed loop: ``c`` clients each send their next request as soon as the previous one ends, until ``--requests``
are done. Every request streams a completion of exactly ``--output-tokens`` tokens (``ignore_eos``, greedy) for a
different slice of real text, so levels compare like with like. ``--invalid-fraction`` mixes in malformed or
out-of-range requests (a soak test): they must get a 4xx, and no valid request may be lost. The server's RSS
comes from its ``/metrics`` (``process_resident_memory_bytes``) when it exports it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field

SERVE_LEVELS = "1,4,16"
PROMPT_WORDS = 48  # ~64 tokens of English prose per prompt
# bodies a server must refuse with a 4xx (bytes are sent as they are)
INVALID = [
    b"{not json",
    {"prompt": 5, "max_tokens": 8},
    {"prompt": "", "max_tokens": 8},
    {"prompt": "hi", "max_tokens": "eight"},
    {"prompt": "hi", "temperature": -1},
    {"prompt": "hi", "max_tokens": 10_000_000},
    {"prompt": "hi", "logit_bias": {"not-a-token": 1}},
    {"prompt": "hi", "n": 0},
    {"messages": []},
    {"messages": [{"role": "robot", "content": "hi"}]},
]


def add_serve_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("serve mode (miaotui bench serve --url URL; --concurrency defaults to 1,4,16 there)")
    g.add_argument("--url", metavar="URL", help="base URL of a running server, e.g. http://127.0.0.1:8000")
    g.add_argument("--requests", type=int, default=64, metavar="N", help="requests per concurrency level (default: 64)")
    g.add_argument("--output-tokens", type=int, default=64, metavar="N",
                   help="tokens generated per request (default: 64)")
    g.add_argument("--invalid-fraction", type=float, default=0.0, metavar="F",
                   help="share of deliberately invalid requests, for a soak test (default: 0)")
    g.add_argument("--api-key", default=os.environ.get("MIAOTUI_API_KEY"), metavar="KEY",
                   help="bearer token for the server (default: $MIAOTUI_API_KEY)")
    # --concurrency is the engines mode's flag; left at its default, serve mode uses its own levels
    p.set_defaults(engines_concurrency=p.get_default("concurrency"))


@dataclass
class Result:
    ok: bool
    status: int
    valid: bool
    ttft: float = 0.0
    e2e: float = 0.0
    tokens: int = 0
    itl: list[float] = field(default_factory=list)


def percentiles(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0}
    s = sorted(xs)

    def q(f: float) -> float:  # linear interpolation between closest ranks
        i = f * (len(s) - 1)
        lo = int(i)
        return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (i - lo)

    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99)}


def _prompts(n: int) -> list[str]:
    from miaotui.bench.prompts import _FALLBACK, default_data_file

    path = default_data_file()
    words = (path.read_text() if path else _FALLBACK * 50).split()
    return [" ".join(words[(i * 37) % max(1, len(words) - PROMPT_WORDS):][:PROMPT_WORDS]) for i in range(n)]


async def _one(client, url: str, model: str, prompt: str, max_tokens: int, invalid) -> Result:
    t0 = time.perf_counter()
    if invalid is not None:
        body = invalid if isinstance(invalid, bytes) else json.dumps(invalid).encode()
        route = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
        r = await client.post(url + route, content=body, headers={"Content-Type": "application/json"})
        return Result(400 <= r.status_code < 500, r.status_code, False, e2e=time.perf_counter() - t0)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    res = Result(False, 0, True)
    last = None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        res.status = r.status_code
        if r.status_code != 200:
            await r.aread()
            return res
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                res.ok = res.tokens == max_tokens
                break
            chunk = json.loads(data)
            if "error" in chunk:
                res.status = 500
                break
            if chunk.get("usage"):
                res.tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                now = time.perf_counter()
                if last is None:
                    res.ttft = now - t0
                else:
                    res.itl.append(now - last)
                last = now
    res.e2e = time.perf_counter() - t0
    return res


async def _level(url: str, model: str, headers: dict, concurrency: int, n: int, max_tokens: int,
                 invalid_fraction: float, prompts: list[str]) -> tuple[list[Result], float]:
    import asyncio

    import httpx

    rng = random.Random(concurrency)
    plan = [INVALID[i % len(INVALID)] if rng.random() < invalid_fraction else None for i in range(n)]
    results: list[Result] = []
    todo = iter(range(n))
    limits = httpx.Limits(max_connections=concurrency + 4)

    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def worker():
            for i in todo:
                try:
                    results.append(await _one(client, url, model, prompts[i % len(prompts)], max_tokens, plan[i]))
                except (httpx.HTTPError, json.JSONDecodeError) as e:
                    print(f"[bench serve] request {i}: {type(e).__name__}: {e}", file=sys.stderr)
                    results.append(Result(False, 0, plan[i] is None))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results, time.perf_counter() - t0


def _summary(concurrency: int, results: list[Result], wall: float) -> dict:
    valid = [r for r in results if r.valid]
    good = [r for r in valid if r.ok]
    tokens = sum(r.tokens for r in good)
    return {
        "concurrency": concurrency, "requests": len(results), "valid": len(valid), "completed": len(good),
        "lost_valid": len(valid) - len(good), "invalid": len(results) - len(valid),
        "invalid_answered_4xx": sum(1 for r in results if not r.valid and r.ok),
        "status_5xx": sum(1 for r in results if r.status >= 500), "wall_s": wall,
        "output_tok_s": tokens / wall if wall > 0 else 0.0, "requests_s": len(good) / wall if wall > 0 else 0.0,
        "ttft_s": percentiles([r.ttft for r in good]),
        "tpot_s": percentiles([(r.e2e - r.ttft) / (r.tokens - 1) for r in good if r.tokens > 1]),
        "itl_s": percentiles([x for r in good for x in r.itl]),
        "e2e_s": percentiles([r.e2e for r in good]),
    }


def _rss(url: str, headers: dict) -> float | None:
    import httpx

    try:
        text = httpx.get(url + "/metrics", headers=headers, timeout=10).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith("process_resident_memory_bytes "):
            return float(line.split()[1])
    return None


def run(args: argparse.Namespace) -> int:
    import asyncio

    import httpx

    from miaotui.errors import MiaotuiError

    concurrency = SERVE_LEVELS if args.concurrency == args.engines_concurrency else args.concurrency
    if not args.url:
        raise MiaotuiError("bench serve needs --url of a running server (start one with `miaotui serve`)")
    try:
        levels = [int(c) for c in concurrency.split(",") if c.strip()]
    except ValueError:
        raise MiaotuiError(f"--concurrency wants comma-separated integers, got {concurrency!r}") from None
    url = args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        models = httpx.get(url + "/v1/models", headers=headers, timeout=30)
    except httpx.HTTPError as e:
        raise MiaotuiError(f"cannot reach {url}: {e}") from None
    if models.status_code != 200:
        raise MiaotuiError(f"{url}/v1/models answered {models.status_code}: {models.text[:200]}")
    model = models.json()["data"][0]["id"]
    prompts = _prompts(max(args.requests, 1))
    asyncio.run(_level(url, model, headers, 1, 2, args.output_tokens, 0.0, prompts))  # warm-up
    rss0 = _rss(url, headers)
    rows = []
    for c in levels:
        print(f"[bench serve] concurrency {c}: {args.requests} requests ...", file=sys.stderr, flush=True)
        results, wall = asyncio.run(_level(url, model, headers, c, args.requests, args.output_tokens,
                                           args.invalid_fraction, prompts))
        rows.append(_summary(c, results, wall))
    rss1 = _rss(url, headers)
    base = rows[0]["output_tok_s"] if rows and rows[0]["concurrency"] == 1 else None
    summary = {"url": url, "model": model, "output_tokens": args.output_tokens, "levels": rows,
               "rss_start_mb": rss0 and rss0 / 2**20, "rss_end_mb": rss1 and rss1 / 2**20,
               "rss_growth_pct": (rss1 / rss0 - 1) * 100 if rss0 and rss1 else None}
    if not args.json:
        print(_table(rows, base))
        if summary["rss_growth_pct"] is not None:
            print(f"server RSS {summary['rss_start_mb']:.0f} → {summary['rss_end_mb']:.0f} MiB "
                  f"({summary['rss_growth_pct']:+.1f} %)")
    if args.plot and rows:
        _plot(rows, args.plot)
    print(json.dumps(summary))
    return 0 if all(r["lost_valid"] == 0 and r["status_5xx"] == 0 for r in rows) else 1


def _table(rows: list[dict], base: float | None) -> str:
    head = (f"{'conc':>4} {'done':>5} {'lost':>4} {'5xx':>4} {'tok/s':>7} {'x1':>5}  "
            f"{'TTFT p50/p90/p99 ms':>22} {'TPOT p50/p99 ms':>16} {'ITL p99 ms':>10} {'E2E p50/p99 s':>14}")
    out = [head]
    for r in rows:
        t, tp, itl, e = r["ttft_s"], r["tpot_s"], r["itl_s"], r["e2e_s"]
        ratio = f"{r['output_tok_s'] / base:.2f}" if base else "-"
        out.append(f"{r['concurrency']:>4} {r['completed']:>5} {r['lost_valid']:>4} {r['status_5xx']:>4} "
                   f"{r['output_tok_s']:>7.1f} {ratio:>5}  "
                   f"{t['p50'] * 1e3:>6.0f}/{t['p90'] * 1e3:>6.0f}/{t['p99'] * 1e3:>7.0f} "
                   f"{tp['p50'] * 1e3:>7.1f}/{tp['p99'] * 1e3:>7.1f} {itl['p99'] * 1e3:>10.1f} "
                   f"{e['p50']:>6.2f}/{e['p99']:>6.2f}")
    return "\n".join(out)


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = [r["concurrency"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(cs, [r["output_tok_s"] for r in rows], marker="o")
    a.set(xlabel="concurrent streams", ylabel="output tok/s", title="throughput")
    for q in ("p50", "p99"):
        b.plot(cs, [r["ttft_s"][q] * 1e3 for r in rows], marker="o", label=f"TTFT {q}")
    b.set(xlabel="concurrent streams", ylabel="ms", title="time to first token")
    b.legend()
    fig.tight_layout()
    fig.savefig(path)
