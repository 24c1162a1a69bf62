"""Speculative decoding on an input-grounded task: plain greedy decode vs prompt lookup (and a draft model).

The task asks the model to return a paragraph of the evaluation text with a name replaced, the case prompt lookup
is built for (summaries, edits, code changes copy spans of their input). Every engine must produce the same
greedy text as plain decoding: a speed-up that changes the output is not one, so a mismatch is reported.
Decode tok/s = (new tokens - 1) / time after the first token, median of ``repeats`` runs after a warm-up.
"""

from __future__ import annotations

import re
import statistics
import sys
from pathlib import Path

from miaotui.config import GenerationStats, SamplingParams

TASK = "Replace the name {name} with Smith in this text:\n\n{text}"


def wikitext_detokenize(text: str) -> str:
    """Undo WikiText's tokenisation (`` @-@ ``, spaces before punctuation) so the paragraph reads as prose,
    which a small model copies far more faithfully."""
    for marker, char in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", ".")):
        text = text.replace(marker, char)
    text = re.sub(r" ([.,;:!?)\]])", r"\1", text)
    return text.replace("( ", "(").replace(" 's", "'s").replace(" n't", "n't")


def grounded_prompt(data: str | Path | None, max_words: int = 150) -> list[dict[str, str]]:
    """A chat request quoting one real paragraph (the first of at least 60 words in the text file) and
    asking for it back with a name replaced: most of the answer is a copy of the prompt."""
    from miaotui.bench.prompts import _FALLBACK, default_data_file

    path = Path(data) if data else default_data_file()
    lines = path.read_text().splitlines() if path else [_FALLBACK]
    para = next((ln.strip() for ln in lines if len(ln.split()) >= 60), lines[0].strip())
    text = wikitext_detokenize(" ".join(para.split()[:max_words]))
    # the article's subject (WikiText paragraphs open with it): the capitalised opening word used most
    words = re.findall(r"\b\w+\b", text)
    opening = [w for w in words[:3] if w[0].isupper()] or words[:1]
    name = max(opening, key=words.count)
    return [{"role": "user", "content": TASK.format(name=name, text=text)}]


def _run(llm, prompt, params: SamplingParams, repeats: int) -> dict:
    llm.generate(prompt, params)  # warm-up: caches, allocations, compilation
    speeds, text, stats = [], None, None
    for _ in range(repeats):
        stats = GenerationStats()
        text = "".join(llm.stream(prompt, params, stats))
        speeds.append(stats.decode_tok_s)
    out = {"decode_tok_s": statistics.median(speeds), "tokens": stats.completion_tokens, "text": text}
    if "spec" in stats.extra:
        out["acceptance_rate"] = stats.extra["spec"]["acceptance_rate"]
        out["tokens_per_forward"] = stats.completion_tokens / max(1, stats.extra["spec"]["target_forwards"])
    return out


def measure(model: str | None, data: str | None, max_tokens: int, k: int, draft: str | None,
            compile: bool, repeats: int) -> dict:
    from miaotui.kernels.decode_plan import decode_path
    from miaotui.llm import LLM

    prompt = grounded_prompt(data)
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    log = lambda s: print(f"[bench speculative] {s}", file=sys.stderr, flush=True)  # noqa: E731
    base = LLM(model)
    rows = []
    path = decode_path(base.loaded.model, compile=False)
    engines = [(f"plain ({path})", None)]
    if compile and path != "native step":  # the native step has nothing to compile
        engines.append(("plain (compiled)", "compile"))
    engines.append((f"prompt lookup k={k}", "ngram"))
    if draft:
        engines.append((f"draft {Path(draft).name} k={k}", draft))
    reference = None
    for name, how in engines:
        log(name)
        if how is None:
            llm = base
        elif how == "compile":
            llm = LLM(base.loaded, compile=True)
        else:
            llm = LLM(base.loaded, speculative=how, num_speculative=k)
        r = _run(llm, prompt, params, repeats)
        reference = reference if reference is not None else r["text"]
        r["same_output"] = r.pop("text") == reference
        rows.append({"engine": name, **r})
    plain = rows[0]["decode_tok_s"]
    best_plain = max(r["decode_tok_s"] for r in rows if r["engine"].startswith("plain"))
    for r in rows:
        r["speedup_vs_plain"] = r["decode_tok_s"] / plain if plain else 0.0
        r["speedup_vs_best_plain"] = r["decode_tok_s"] / best_plain if best_plain else 0.0
    return {"task": prompt[0]["content"].split(":")[0], "max_tokens": max_tokens, "num_speculative": k, "results": rows}


def table(summary: dict) -> str:
    head = "| engine | decode tok/s | × plain | × best plain | tokens | tokens/forward | accepted | same output |"
    lines = [head, "|" + "---|" * 8]
    for r in summary["results"]:
        tpf = f"{r['tokens_per_forward']:.2f}" if "tokens_per_forward" in r else "1.00"
        acc = f"{r['acceptance_rate']:.0%}" if "acceptance_rate" in r else "—"
        lines.append(f"| {r['engine']} | {r['decode_tok_s']:.1f} | {r['speedup_vs_plain']:.2f} | "
                     f"{r['speedup_vs_best_plain']:.2f} | {r['tokens']} | {tpf} | {acc} | "
                     f"{'yes' if r['same_output'] else 'NO'} |")
    return "\n".join(lines)
