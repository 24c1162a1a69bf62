"""Find the fastest compressed version of a model that stays within a quality budget, and write it.

Decoders: the search tries the source itself, uniform int4 (RTN at group 128/64/32) and int8, mixed
precision (the layers most sensitive to int4 — each measured alone — kept at int8), calibrated int4 (AWQ,
GPTQ) and W8A8, and, where those steps are installed, structured pruning and low-rank factorisation
(+ distillation) on top of the best recipe (unstructured sparsity is not: stored dense, it never runs
faster here). Each is evaluated on a search split of the text against the source's own predictions.

Encoders (BERT family; with a cosine/spearman budget and no --model, all-MiniLM-L6-v2): the source in
fp32 and bf16, int8 weight-only, W8A8, W8A8 with the layers most sensitive to it kept float, attention
heads removed, the least important layers dropped (alone and under the best quantization) and, with
--calib FILE, a dropped-layers model healed by distillation. Each is compared with the source's embeddings
of a search split of the --data paragraphs.

Every candidate is timed with the real engine on this machine; candidates that cannot win are skipped
before they are built. The winner is re-checked on a held-out split and written to DIR as a normal
checkpoint (generate/embed, serve, bench and eval load it), with report.md, report.json and pareto.png.

Budgets (comma-separated, all must hold):
  ppl+3%          perplexity at most 3% above the source's (ppl+0.5: at most 0.5 above)
  ppl<=25         perplexity at most 25
  kld<=0.02       mean KL divergence from the source's next-token distribution
  top1>=0.95      the source's top token kept at least 95% of the time
  cosine>=0.99    encoders: mean cosine of each paragraph's embedding to the source's
  spearman>=0.98  encoders: rank correlation of the pairwise similarities with the source's

Results are cached in DIR/search: a killed run resumes without redoing finished candidates (--fresh
starts over). Exit status: 0 with a checkpoint, 2 when nothing meets the budget (the closest candidate
is named in the message and the report), 1 on bad input.

examples:
  miaotui optimize --budget ppl+3% --output out/opt
  miaotui optimize -m model.gguf --budget "kld<=0.05,top1>=0.9" --objective prefill --time-limit 1h -o out/fast
  miaotui generate --model out/opt "The capital of France is"
  miaotui optimize --budget cosine>=0.99 --objective latency --time-limit 10m -o out/minilm
  miaotui embed --model out/minilm "a cat sits on the mat"
"""

from __future__ import annotations

import argparse
import json
import sys


def add_args(p: argparse.ArgumentParser) -> None:
    from miaotui.optimize.config import DEFAULT_TIME_LIMIT, FAMILIES

    p.add_argument("-m", "--model", metavar="PATH",
                   help="source: a Hugging Face folder, .gguf file or BERT-family encoder folder (default: the "
                        "embedded SmolLM2-135M-Instruct; with a cosine/spearman budget, all-MiniLM-L6-v2)")
    p.add_argument("-b", "--budget", required=True, metavar="SPEC",
                   help="quality to keep, e.g. ppl+3%%, ppl<=25, kld<=0.02, top1>=0.95 (decoders), cosine>=0.99, "
                        "spearman>=0.98 (encoders); several comma-separated constraints must all hold")
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="folder for the chosen checkpoint, report.md/json, pareto.png and the result cache")
    p.add_argument("--objective", choices=["decode", "prefill", "throughput", "latency", "memory"],
                   help="what 'fastest' means. Decoders: batch-1 decode tok/s (decode, the default), prefill tok/s "
                        "at 512 tokens, aggregate tok/s of 4 concurrent requests (throughput), or fewest weight "
                        "bytes per token (memory). Encoders: texts/s at batch 32 (throughput, the default), "
                        "ms per single input (latency), or fewest weight bytes (memory)")
    p.add_argument("-t", "--time-limit", default=f"{int(DEFAULT_TIME_LIMIT // 60)}m", metavar="DURATION",
                   help="wall-clock limit for the whole search, e.g. 90s, 30m, 1h30m (default: 30m); no candidate "
                        "is started that would not finish in time, and the report lists what was skipped")
    p.add_argument("--data", metavar="FILE",
                   help="text the quality is measured on, cut into search and held-out windows (encoders: its "
                        "paragraphs, one per line) (default: the WikiText excerpt); calibration never uses it")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", dest="resume", action="store_true", default=True,
                   help="reuse the results cached in DIR/search by an earlier or killed run (default)")
    g.add_argument("--fresh", dest="resume", action="store_false",
                   help="forget DIR/search's cached results and measure everything again")
    g = p.add_argument_group("search")
    g.add_argument("--families", default=",".join(FAMILIES), metavar="LIST",
                   help=f"candidate families to try, comma-separated (default: all: {','.join(FAMILIES)}); "
                        "the source itself is always measured. dtype (bf16) is for encoders, groups and lowrank "
                        "for decoders")
    g.add_argument("--max-candidates", type=int, metavar="N",
                   help="stop after N candidates measured or read from the cache (default: no limit)")
    g.add_argument("--ctx", type=int, default=512, help="decoders: evaluation window length in tokens (default: 512)")
    g.add_argument("--search-windows", type=int, default=4, metavar="N",
                   help="decoders: windows every candidate is evaluated on (default: 4)")
    g.add_argument("--heldout-windows", type=int, default=4, metavar="N",
                   help="decoders: separate windows the winner is checked on (default: 4)")
    g.add_argument("--sensitivity-windows", type=int, default=2, metavar="N",
                   help="decoders: windows of the search split the per-layer sensitivity is measured on (default: 2)")
    g.add_argument("--decode-tokens", type=int, default=48, metavar="N",
                   help="decoders: tokens per decode timing (median of --repeats; default: 48)")
    g.add_argument("--repeats", type=int, default=3, metavar="N", help="timing repeats, median taken (default: 3)")
    g.add_argument("--compile", action="store_true", help="time the compiled decode step (slower to measure)")
    g = p.add_argument_group("encoders")
    g.add_argument("--search-texts", type=int, metavar="N",
                   help="paragraphs every candidate is compared on (default: 64, or 2/3 of a shorter --data)")
    g.add_argument("--heldout-texts", type=int, metavar="N",
                   help="separate paragraphs the winner is checked on (default: 32, or the rest)")
    g.add_argument("--sensitivity-texts", type=int, metavar="N",
                   help="search paragraphs the per-layer sensitivity is measured on (default: 32)")
    g = p.add_argument_group("calibration (AWQ, GPTQ, SmoothQuant, pruning; encoders: distillation)")
    g.add_argument("--calib", metavar="FILE",
                   help="text file to calibrate on (default: data-free, self-generated); encoders also distil on "
                        "it (one text per line, or .jsonl with a text field): without it no distillation")
    g.add_argument("--calib-samples", type=int, metavar="N", help="calibration sequences (default: the compressors')")
    g.add_argument("--calib-len", type=int, metavar="N", help="tokens per calibration sequence (default: 512)")
    g.add_argument("--seed", type=int, default=0, help="seed for calibration text (default: 0)")
    g = p.add_argument_group("output")
    g.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: PyTorch's choice)")
    g.add_argument("--json", action="store_true", help="end stdout with one JSON line: status, choice, candidates")


def run(args: argparse.Namespace) -> int:
    import torch

    from miaotui.optimize.budget import parse_budget
    from miaotui.optimize.config import OptimizeConfig
    from miaotui.optimize.search import optimize

    if args.threads:
        torch.set_num_threads(args.threads)
    parse_budget(args.budget)  # a bad budget fails before anything loads
    cfg = OptimizeConfig(model=args.model, budget=args.budget, output=args.output, objective=args.objective,
                         time_limit=args.time_limit, data=args.data, resume=args.resume, ctx=args.ctx,
                         search_windows=args.search_windows, heldout_windows=args.heldout_windows,
                         sensitivity_windows=args.sensitivity_windows, max_candidates=args.max_candidates,
                         search_texts=args.search_texts, heldout_texts=args.heldout_texts,
                         sensitivity_texts=args.sensitivity_texts,
                         families=tuple(f.strip() for f in args.families.split(",") if f.strip()),
                         calib=args.calib, calib_samples=args.calib_samples, calib_len=args.calib_len,
                         seed=args.seed, compile=args.compile, decode_tokens=args.decode_tokens,
                         repeats=args.repeats, progress=sys.stderr.isatty())
    result = optimize(cfg)
    stream = sys.stdout if result.exit_code == 0 else sys.stderr
    print(result.message, file=stream)
    print(f"report: {result.output / 'report.md'}", file=sys.stderr)
    if args.json:
        r = result.report
        summary = {"status": r["status"], "chosen": r["chosen"], "message": r["message"], "output": str(result.output),
                   "heldout": r["heldout"], "frontier": r["frontier"],
                   "candidates": [{k: c.get(k) for k in ("name", "outcome", "bytes", "speed", "quality")}
                                  for c in r["candidates"]]}
        print(json.dumps(summary, default=str))
    return result.exit_code
