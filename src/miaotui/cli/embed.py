"""Embed texts with a BERT-family encoder (default: all-MiniLM-L6-v2), pooled and normalised as the model's
sentence-transformers config says.

examples:
  miaotui embed "a cat sits on the mat" "a dog lies on the rug"
  miaotui embed --file paragraphs.txt --output emb.npy --batch-size 64
  cat texts.jsonl | miaotui embed --output emb.jsonl
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings


def add_encoder_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by the encoder verbs (embed, fill-mask, classify)."""
    p.add_argument("-m", "--model", metavar="PATH",
                   help="a Hugging Face encoder folder (BERT, RoBERTa, XLM-RoBERTa; sentence-transformers layout "
                        "understood) (default: the installed all-MiniLM-L6-v2)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="weight dtype; on CPUs without AVX512-BF16/AMX bf16 halves the memory but is computed in "
                        "fp32, so it is not faster (default: fp32)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for PyTorch (default: PyTorch's choice)")
    p.add_argument("--compile", action="store_true",
                   help="compile the encoder with torch.compile (pays a one-off compilation at the start)")
    p.add_argument("-b", "--batch-size", type=int, default=32, metavar="N",
                   help="inputs per forward pass; inputs are sorted by length and packed (default: 32)")
    p.add_argument("--no-truncate", action="store_true",
                   help="refuse inputs longer than the model's limit instead of truncating them with a warning")


def add_text_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to process (default: --file, else stdin)")
    p.add_argument("-f", "--file", metavar="FILE",
                   help="read texts from FILE: one per non-blank line, or .jsonl objects with a \"text\" field")


def gather_texts(args: argparse.Namespace) -> list[str]:
    from miaotui.encoder.io import read_texts
    from miaotui.errors import MiaotuiError

    texts = list(args.texts)
    if args.file:
        texts += read_texts(args.file)
    if not args.texts and not args.file:
        if sys.stdin.isatty():
            raise MiaotuiError("no input: pass texts as arguments, --file FILE, or pipe them on stdin")
        texts = [line for line in sys.stdin.read().splitlines() if line.strip()]
    if not texts:
        raise MiaotuiError("empty input: no texts to process")
    return texts


def load_encoder_from_args(args: argparse.Namespace):
    import torch

    from miaotui.encoder import Encoder

    if args.threads:
        torch.set_num_threads(args.threads)
    return Encoder(args.model, dtype=args.dtype, compile=args.compile)


def run_quietly(verb: str, fn):
    """Run ``fn()``, turning truncation warnings into one stderr line each."""
    from miaotui.encoder import TruncationWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TruncationWarning)
        result = fn()
    for w in caught:
        if issubclass(w.category, TruncationWarning):
            print(f"miaotui {verb}: warning: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return result


def add_args(p: argparse.ArgumentParser) -> None:
    add_text_args(p)
    add_encoder_args(p)
    p.add_argument("-o", "--output", metavar="FILE.npy|FILE.jsonl",
                   help="write the embeddings to a .npy array or .jsonl lines (default: JSON lines on stdout)")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="L2-normalise the embeddings (default: as the model's sentence-transformers config says)")


def run(args: argparse.Namespace) -> int:
    import json

    from miaotui.encoder.io import write_embeddings
    from miaotui.errors import MiaotuiError

    if args.output and not args.output.endswith((".npy", ".jsonl")):
        raise MiaotuiError(f"{args.output}: unknown output format (use .npy or .jsonl)")
    texts = gather_texts(args)
    enc = load_encoder_from_args(args)
    start = time.perf_counter()
    emb = run_quietly("embed", lambda: enc.encode(texts, batch_size=args.batch_size, normalize=args.normalize,
                                                  truncate=not args.no_truncate, progress=sys.stderr.isatty()))
    elapsed = time.perf_counter() - start
    if args.output:
        write_embeddings(args.output, emb, texts)
    else:
        for i, vec in enumerate(emb):
            print(json.dumps({"index": i, "embedding": vec.tolist()}))
    print(f"[{len(texts)} texts, {emb.shape[1]} dims, {len(texts) / elapsed:.1f} texts/s"
          + (f", written to {args.output}" if args.output else "") + "]", file=sys.stderr)
    return 0
