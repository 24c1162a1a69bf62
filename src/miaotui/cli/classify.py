"""Classify texts with a sequence-classification encoder (a *ForSequenceClassification checkpoint).

examples:
  miaotui classify "I loved this film" "Dull and too long" -m ./sst2-model
  miaotui classify --file reviews.txt -m ./sst2-model --top-k 2 --json
"""

from __future__ import annotations

import argparse
import json
import sys

from miaotui.cli.embed import add_encoder_args, add_text_args, gather_texts, load_encoder_from_args, run_quietly


def add_args(p: argparse.ArgumentParser) -> None:
    add_text_args(p)
    add_encoder_args(p)
    p.add_argument("-k", "--top-k", type=int, default=1, metavar="K", help="labels to show per text (default: 1)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON line per text: {\"index\", \"labels\": [{\"label\", \"score\"}]}")


def run(args: argparse.Namespace) -> int:
    texts = gather_texts(args)
    enc = load_encoder_from_args(args)
    results = run_quietly("classify", lambda: enc.classify(texts, top_k=args.top_k, batch_size=args.batch_size,
                                                           truncate=not args.no_truncate,
                                                           progress=sys.stderr.isatty()))
    for i, labels in enumerate(results):
        if args.json:
            print(json.dumps({"index": i, "labels": labels}, ensure_ascii=False))
        else:
            print("\t".join(f"{x['label']} {x['score']:.4f}" for x in labels))
    return 0
