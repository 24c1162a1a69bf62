"""Benchmark results as a table, one JSON line, and a PNG."""

from __future__ import annotations

from pathlib import Path


def table(results: list[dict], bandwidth: float, prefill_lengths: list[str], concurrency: list[str] = ()) -> str:
    head = (["engine"] + [f"prefill {n}" for n in prefill_lengths]
            + ["TTFT ms", "decode tok/s", "% roofline"] + [f"x{n} tok/s" for n in concurrency]
            + ["peak RSS MB", "compile s"])
    rows = [head]
    for r in results:
        ceiling = bandwidth / r["weight_bytes"] if r.get("weight_bytes") else 0
        rows.append([r["engine"]] + [f"{r['prefill_tok_s'][n]:.0f}" for n in prefill_lengths] + [
            f"{r['ttft_s'] * 1000:.0f}", f"{r['decode_tok_s']:.1f}",
            f"{100 * r['decode_tok_s'] / ceiling:.0f}%" if ceiling else "-",
        ] + [f"{r['throughput_tok_s'][n]:.0f}" if n in r.get("throughput_tok_s", {}) else "-" for n in concurrency] + [
            f"{r['peak_rss_bytes'] / 2**20:.0f}", f"{r['compile_s']:.1f}",
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def plot(results: list[dict], path: str | Path, prefill_lengths: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["engine"] for r in results]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 0.5 * len(names) + 2.5))
    ax1.barh(names, [r["decode_tok_s"] for r in results], color="tab:blue")
    ax1.set_xlabel("batch-1 decode tok/s (higher is better)")
    ax1.invert_yaxis()
    n = "512" if "512" in prefill_lengths else prefill_lengths[-1]
    ax2.barh(names, [r["prefill_tok_s"][n] for r in results], color="tab:orange")
    ax2.set_xlabel(f"prefill tok/s, {n}-token prompt")
    ax2.invert_yaxis()
    ax2.set_yticklabels([])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
