"""Encoder throughput: miaotui vs transformers on the same texts, sentences/s at batch 32 and batch 1.

transformers runs the way sentence-transformers' ``encode`` does (sort by length, pad to the longest in
each batch, mean-pool, normalise), so the comparison is algorithm for algorithm. Engines alternate within
each repeat, so load from other processes hits all of them alike; the median of the repeats is reported.

    python -m miaotui.encoder.bench --texts ../shared/data/wikitext2-test-excerpt.txt --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

ENGINES = ("miaotui:fp32", "miaotui:bf16", "transformers:fp32", "transformers:bf16")


class TransformersEncoder:
    """sentence-transformers' algorithm on a plain ``AutoModel`` (mean pooling + normalise)."""

    def __init__(self, path: Path, dtype: torch.dtype, max_tokens: int):
        from transformers import AutoModel, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path), dtype=dtype).eval()
        self.max_tokens = max_tokens

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int) -> torch.Tensor:
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # what sentence-transformers sorts by
        out = torch.empty(len(texts), self.model.config.hidden_size)
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            b = self.tok([texts[i] for i in idx], padding=True, truncation=True, max_length=self.max_tokens,
                         return_tensors="pt")
            h = self.model(**b).last_hidden_state.float()
            m = b["attention_mask"][..., None].float()
            out[idx] = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
        return out


def make_engine(spec: str, path: Path | None):
    from miaotui.encoder import Encoder

    name, dtype = spec.split(":")
    compile_ = dtype.endswith("+compile")
    dtype = dtype.removesuffix("+compile")
    if name == "miaotui":
        enc = Encoder(path, dtype=dtype, compile=compile_)
        return lambda texts, bs: enc.encode(texts, batch_size=bs, convert_to="tensor"), enc
    if name == "transformers":
        ref = Encoder(path)  # only for the folder and the length limit
        te = TransformersEncoder(ref.loaded.path, {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype],
                                 ref.max_tokens)
        return te.encode, ref
    raise ValueError(f"unknown engine {spec!r}")


def bench(texts: list[str], model: str | Path | None = None, engines=ENGINES, batch: int = 32,
          single_texts: int = 16, repeats: int = 3) -> dict:
    """sentences/s at ``batch`` over all ``texts``, and at batch 1 over the first ``single_texts``;
    plus each engine's mean cosine to miaotui fp32."""
    import warnings

    warnings.filterwarnings("ignore", message=".*truncated")
    runs = {spec: make_engine(spec, model)[0] for spec in engines}
    for fn in runs.values():  # warm-up (and compile, for +compile engines)
        fn(texts[:batch], batch)
        fn(texts[:2], 1)
    times = {spec: {"batch": [], "single": []} for spec in engines}
    for _ in range(repeats):
        for spec, fn in runs.items():
            t0 = time.perf_counter()
            fn(texts, batch)
            times[spec]["batch"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            fn(texts[:single_texts], 1)
            times[spec]["single"].append(time.perf_counter() - t0)
    base = runs[engines[0]](texts, batch)
    result = {}
    for spec, fn in runs.items():
        cos = (fn(texts, batch).float() * base.float()).sum(-1)
        result[spec] = {
            f"batch{batch}_per_s": len(texts) / statistics.median(times[spec]["batch"]),
            "batch1_per_s": single_texts / statistics.median(times[spec]["single"]),
            "batch1_ms": 1000 * statistics.median(times[spec]["single"]) / single_texts,
            "mean_cosine_to_first": float(cos.mean()), "min_cosine_to_first": float(cos.min()),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--texts", required=True, help="one text per non-blank line")
    p.add_argument("-m", "--model", help="encoder folder (default: all-MiniLM-L6-v2)")
    p.add_argument("--engines", default=",".join(ENGINES),
                   help="comma-separated engine:dtype[+compile] (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    p.add_argument("--batch", type=int, default=32, help="batch size (default: 32)")
    p.add_argument("--single-texts", type=int, default=16, help="texts timed one at a time (default: 16)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats, median reported (default: 3)")
    args = p.parse_args(argv)
    from miaotui.encoder.io import read_texts

    torch.set_num_threads(args.threads)
    texts = read_texts(args.texts)
    res = bench(texts, args.model, tuple(args.engines.split(",")), args.batch, args.single_texts, args.repeats)
    print(f"{len(texts)} texts, {args.threads} threads, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}")
    print(f"| engine | batch {args.batch} texts/s | batch 1 texts/s | batch 1 ms | cosine to {args.engines.split(',')[0]} |")
    print("|---|---|---|---|---|")
    for spec, r in res.items():
        print(f"| {spec} | {r[f'batch{args.batch}_per_s']:.1f} | {r['batch1_per_s']:.1f} | {r['batch1_ms']:.1f} | "
              f"{r['mean_cosine_to_first']:.6f} (min {r['min_cosine_to_first']:.6f}) |")
    print(json.dumps({"texts": len(texts), "threads": args.threads, "results": res}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
