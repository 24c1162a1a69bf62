"""What a search found, for people and programs: ``report.md``, ``report.json`` and ``pareto.png``.

The plot puts every measured candidate at (objective, quality): the Pareto frontier (no candidate both
faster and better) is a line, candidates within budget are filled, the budget's limit is a dashed line and
the choice is a star.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_report(out_dir: str | Path, report: dict[str, Any]) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md", "png": out / "pareto.png"}
    paths["json"].write_text(json.dumps(report, indent=2, default=str))
    paths["md"].write_text(markdown(report))
    if any(r.get("status") == "measured" for r in report["candidates"]):
        plot(report, paths["png"])
    else:
        paths["png"].unlink(missing_ok=True)
        del paths["png"]
    return paths


def _num(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "–"
    return f"{x:.{digits}g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


def _speed(r: dict, report: dict) -> str:
    sp = r.get("speed")
    if not sp:
        return "–"
    return f"{sp['value']:.1f}" if abs(sp["value"]) >= 10 else f"{sp['value']:.3g}"


def _encoder(report: dict) -> bool:
    return report.get("kind") == "encoder"


def _data_line(report: dict) -> str:
    d = report["data"]
    if _encoder(report):
        return (f"- data: {d['file']}, {d['search_texts']} search + {d['heldout_texts']} held-out paragraphs; "
                "quality: embeddings against the source's (cosine, similarity Spearman)")
    return (f"- data: {d['file']}, {d['search_windows']} search + {d['heldout_windows']} held-out windows of "
            f"{d['ctx']} tokens; source perplexity {d['reference_perplexity_search']:.4f} (search), "
            f"{d['reference_perplexity_heldout']:.4f} (held-out)")


def _heldout_lines(report: dict) -> list[str]:
    h, path = report["heldout"], report.get("checkpoint", {}).get("path", "DIR")
    if _encoder(report):
        dtype = next((r.get("dtype") for r in report["candidates"] if r["name"] == report["chosen"]), None)
        return [f"Held-out check of `{report['chosen']}`: mean cosine {h['mean_cosine']:.5f} (min "
                f"{h['min_cosine']:.5f}), similarity Spearman {h['similarity_spearman']:.5f}.", "",
                "```bash", f"miaotui embed --model {path}{' --dtype bf16' if dtype == 'bf16' else ''} "
                "\"a cat sits on the mat\"", "```", ""]
    return [f"Held-out check of `{report['chosen']}`: perplexity {h['perplexity']:.4f} (source "
            f"{h['reference_perplexity']:.4f}), KLD {_num(h.get('kld_mean'))}, top-1 "
            f"{100 * h['top1_agreement']:.2f}%.", "",
            "```bash", f"miaotui generate --model {path} \"The capital of France is\"", "```", ""]


def _quality_columns(report: dict) -> tuple[str, str]:
    if _encoder(report):
        return "mean cosine | min cosine | spearman", "---:|---:|---:"
    return "perplexity | KLD | top-1", "---:|---:|---:"


def _quality_cells(report: dict, q: dict) -> str:
    if _encoder(report):
        return f"{q['mean_cosine']:.5f} | {q['min_cosine']:.4f} | {q['similarity_spearman']:.5f}"
    return f"{q['perplexity']:.4f} | {_num(q.get('kld_mean'))} | {100 * q['top1_agreement']:.2f}%"


def _runoff_lines(report: dict) -> list[str]:
    ro = report.get("runoff")
    if not ro:
        return []
    names = ", ".join(f"`{c['name']}`" for c in ro["candidates"])
    if ro.get("skipped"):
        return [f"Runoff between {names} skipped: {ro['skipped']}.", ""]
    timed = "; ".join(f"`{c['name']}` {c['median']:.4g} ({', '.join(f'{v:.4g}' for v in c['values'])})"
                      for c in ro["candidates"])
    return [f"Runoff: the candidates within {ro['margin']:.0%} of the fastest within budget, timed again in "
            f"turns ({ro['rounds']} rounds), median {ro['unit']}: {timed} → `{ro['winner']}`.", ""]


def markdown(report: dict) -> str:
    axis = report["quality_axis"]
    unit = report["objective_unit"]
    lines = [f"# miaotui optimize: {Path(report['model']).name}", "",
             f"- budget: `{report['budget']}` · objective: {report['objective']} ({report['objective_label']}, "
             f"{unit}, {'higher' if report['higher_is_better'] else 'lower'} is better)",
             _data_line(report),
             f"- time: {report['time']['spent_s']:.0f} s of a {report['time']['limit_s']:.0f} s limit · "
             f"{report['counts']['measured']} measured ({report['counts']['built']} built now, "
             f"{report['counts']['from_cache']} from the cache), {report['counts']['skipped']} skipped"
             + (f" · stopped: {report['stopped']}" if report.get("stopped") else ""),
             "", f"**{report['status']}**: {report['message']}", ""]
    if report.get("heldout"):
        lines += _heldout_lines(report)
    lines += _runoff_lines(report)
    for r in report.get("heldout_rejected", []):
        lines.append(f"- `{r['name']}` was within budget on the search split but not on the held-out split: "
                     f"{'; '.join(r['failures'])}")
    head, align = _quality_columns(report)
    lines += ["## Candidates (search split)", "",
              f"| candidate | {report['objective']} ({unit}) | MB | {head} | within budget | frontier | build s | "
              "total s |",
              f"|---|---:|---:|{align}|:-:|:-:|---:|---:|"]
    frontier = set(report["frontier"])
    measured = [r for r in report["candidates"] if r.get("status") == "measured"]
    sign = 1 if report["higher_is_better"] else -1
    for r in sorted(measured, key=lambda r: -sign * r["speed"]["value"]):
        name = f"**{r['name']}**" if r["name"] == report["chosen"] else r["name"]
        lines.append(f"| {name}{' (cached)' if r['from_cache'] else ''} | {_speed(r, report)} | "
                     f"{r['bytes'] / 1e6:.1f} | {_quality_cells(report, r['quality'])} | "
                     f"{'yes' if r['in_budget'] else 'no'} | "
                     f"{'●' if r['name'] in frontier else ''} | {r.get('build_s', 0):.1f} | "
                     f"{r.get('total_s', 0):.1f} |")
    errors = [r for r in report["candidates"] if r.get("status") == "error"]
    if errors:
        lines += ["", "Failed to build:", ""] + [f"- `{r['name']}`: {r['error']}" for r in errors]
    if report["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- `{s['name']}`: {s['reason']}" for s in report["skipped"]]
    lines += ["", "## Recipes", ""]
    for r in report["candidates"]:
        steps = json.dumps(r["steps"]) if r["steps"] else "(none: the source)"
        if r.get("dtype"):
            steps += f" in {r['dtype']}"
        lines.append(f"- `{r['name']}` ({r['family']}): {r.get('note') or ''} — `{steps}`")
    sens = {k: v for k, v in report.get("sensitivity", {}).items() if v}
    for kind, s in sens.items():
        what = {"quant": "its linears int4-quantized alone",
                "w8a8": "its linears W8A8 alone"}.get(kind, "removed alone")
        scores, measure = s.get("scores", s.get("kld")), s.get("measure", "kld")
        on = (f"{s['settings']['texts']} paragraph(s)" if "texts" in s["settings"]
              else f"{s['settings'].get('windows')} window(s)")
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        lines += ["", f"## Per-layer sensitivity ({kind}: each layer {what}; {measure} on {on})", "",
                  "most sensitive: " + ", ".join(f"layer {i} ({_num(scores[i], 3)})" for i in order[:8]),
                  "least sensitive: " + ", ".join(f"layer {i} ({_num(scores[i], 3)})" for i in order[::-1][:8])]
    lines += ["", f"Quality axis of the frontier: {axis['metric']} ({axis['op']} is within budget); speed measured "
                  "on this machine while it ran (numbers from a loaded machine are noisy).", ""]
    return "\n".join(lines)


def plot(report: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axis = report["quality_axis"]
    measured = [r for r in report["candidates"] if r.get("status") == "measured"]
    xs = [r["speed"]["value"] for r in measured]
    ys = [r["quality"][axis["key"]] for r in measured]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for r, x, y in zip(measured, xs, ys):
        ax.scatter([x], [y], s=40, facecolors="tab:blue" if r["in_budget"] else "white", edgecolors="tab:blue",
                   zorder=3)
        ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = [r for r in measured if r["name"] in set(report["frontier"])]
    front.sort(key=lambda r: r["speed"]["value"])
    if front:
        # a staircase: between two frontier points, the slower one's quality is the best available
        ax.plot([r["speed"]["value"] for r in front], [r["quality"][axis["key"]] for r in front], "-",
                drawstyle="steps-pre" if report["higher_is_better"] else "steps-post", color="tab:orange",
                label="Pareto frontier", zorder=2)
    chosen = next((r for r in measured if r["name"] == report["chosen"]), None)
    if chosen is not None:
        ax.scatter([chosen["speed"]["value"]], [chosen["quality"][axis["key"]]], marker="*", s=300, color="tab:red",
                   label=f"chosen: {chosen['name']}", zorder=4)
    if axis.get("limit_search") is not None:
        ax.axhline(axis["limit_search"], ls="--", color="gray", label=f"budget {report['budget']} (search split)")
    positive = [y for y in ys if y > 0]
    if axis["key"].startswith("kld") and positive and max(positive) / min(positive) > 100:
        ax.set_yscale("log")
    ax.set_xlabel(f"{report['objective_label']} ({report['objective_unit']})"
                  + ("" if report["higher_is_better"] else ", lower is better"))
    ax.set_ylabel(axis["metric"] + (" (lower is better)" if axis["op"] == "<=" else " (higher is better)"))
    ax.set_title(f"miaotui optimize: {Path(report['model']).name} (filled: within budget)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
