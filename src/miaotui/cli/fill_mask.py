"""Fill in masked words with a masked-LM encoder (a *ForMaskedLM checkpoint, e.g. bert-base-uncased).

examples:
  miaotui fill-mask "The capital of France is [MASK]." -m ./bert-base-uncased
  miaotui fill-mask "Paris is the <mask> of France." -m ./roberta-base --top-k 3 --json
"""

from __future__ import annotations

import argparse
import json

from miaotui.cli.embed import add_encoder_args, load_encoder_from_args, run_quietly


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", help="text with one or more [MASK] (or <mask>) tokens")
    add_encoder_args(p)
    p.add_argument("-k", "--top-k", type=int, default=5, metavar="K", help="candidates per mask (default: 5)")
    p.add_argument("--json", action="store_true", help="print one JSON line: a list of candidates per mask")


def run(args: argparse.Namespace) -> int:
    from miaotui.errors import MiaotuiError

    if not args.text.strip():
        raise MiaotuiError("empty input")
    enc = load_encoder_from_args(args)
    results = run_quietly("fill-mask", lambda: enc.fill_mask(args.text, top_k=args.top_k))
    if args.json:
        print(json.dumps(results, ensure_ascii=False))
        return 0
    for n, cands in enumerate(results):
        if len(results) > 1:
            print(f"mask {n + 1}:")
        for c in cands:
            print(f"{c['score']:.4f}  {c['token']:<15}  {c['sequence']}")
    return 0
