"""The one report ``compress`` prints: size, quality against the source, speed against the source."""

from __future__ import annotations

import json


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def speed_rows(bench: dict) -> list[dict]:
    rows = []
    base = next((r for r in bench["results"] if r["spec"].startswith("miaotui")), None)
    for r in bench["results"]:
        rows.append({"engine": r["engine"], "decode_tok_s": r["decode_tok_s"],
                     "prefill_512_tok_s": r["prefill_tok_s"].get("512"),
                     "peak_rss_mb": r["peak_rss_bytes"] / 1e6, "weight_mb": r["weight_bytes"] / 1e6,
                     "decode_vs_fp32": r["decode_tok_s"] / base["decode_tok_s"] if base else None})
    return rows


def print_report(manifest: dict, quality: dict | None, bench: dict | None, source_bytes: int,
                 plot: str | None = None, as_json: bool = False) -> dict:
    weights = manifest["weights"]["bytes"]
    name = manifest["recipe"].get("name", "?")
    result = {"recipe": name, "checkpoint_bytes": weights, "source_fp32_bytes": source_bytes,
              "bytes_ratio": weights / source_bytes, "quality": quality,
              "speed": speed_rows(bench) if bench else None,
              "bench": {k: v for k, v in bench.items() if k != "results"} if bench else None}
    if not as_json:
        print(f"recipe {name}: {weights / 1e6:.1f} MB of weights, {100 * weights / source_bytes:.1f}% of the "
              f"fp32 source ({source_bytes / 1e6:.1f} MB)")
        if quality:
            ppl, ref = quality["perplexity"], quality.get("reference_perplexity")
            delta = f" ({100 * (ppl / ref - 1):+.2f}%)" if ref else ""
            print(f"quality vs source on {quality['windows']} x {quality['ctx']} tokens of {quality['data']}: "
                  f"perplexity {_fmt(ref, '.3f')} -> {ppl:.3f}{delta}, KLD mean {_fmt(quality['kld_mean'], '.4f')} "
                  f"p99 {_fmt(quality['kld_p99'], '.4f')}, top-1 agreement "
                  f"{_fmt(quality['top1_agreement'] and 100 * quality['top1_agreement'], '.2f')}%")
        if bench:
            print(f"speed ({bench['threads']} threads, read bandwidth {bench['bandwidth_gb_s']:.1f} GB/s):")
            print(f"  {'engine':<28} {'decode tok/s':>12} {'x fp32':>7} {'prefill512':>11} {'weights MB':>11} "
                  f"{'peak RSS MB':>12}")
            for r in result["speed"]:
                print(f"  {r['engine']:<28} {r['decode_tok_s']:>12.1f} {_fmt(r['decode_vs_fp32'], '.2f'):>7} "
                      f"{_fmt(r['prefill_512_tok_s'], '.0f'):>11} {r['weight_mb']:>11.1f} {r['peak_rss_mb']:>12.0f}")
            for s in bench.get("skipped", []):
                print(f"  (skipped {s})")
    if plot and bench:
        _plot(result, plot)
    print(json.dumps(result))
    return result


def _plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["speed"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    names = [r["engine"] for r in rows]
    ax[0].barh(names, [r["decode_tok_s"] for r in rows], color="tab:blue")
    ax[0].set_xlabel("batch-1 decode tok/s")
    ax[1].barh(names, [r["weight_mb"] for r in rows], color="tab:gray")
    ax[1].set_xlabel("weight MB read per token")
    q = result.get("quality")
    title = f"recipe {result['recipe']}"
    if q:
        title += f": PPL {q['perplexity']:.2f} (source {q.get('reference_perplexity') or 0:.2f}), " \
                 f"KLD {q['kld_mean']:.4f}, top-1 {100 * q['top1_agreement']:.1f}%"
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
