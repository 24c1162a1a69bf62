"""``miaotui compress`` on a BERT-family encoder: the same recipes and checkpoint format as the decoders.

The recipe's steps run on a ``LoadedEncoder``: ``quantize`` through ``encoder/quantize.py`` (the decoder
step walks decoder layers), ``prune-heads`` / ``prune-layers`` / ``prune-channels`` / ``distill`` through
their own modules, which dispatch encoders themselves. The checkpoint gets the source's sentence-transformers
files (pooling, length limit) and, with ``--eval``, the embedding quality against the source in its
manifest: mean / min cosine and the Spearman correlation of the pairwise similarities.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from miaotui.errors import MiaotuiError


def embedding_quality(loaded, texts: list[str], reference: np.ndarray) -> dict[str, Any]:
    """Mean / min cosine and similarity Spearman of ``loaded``'s embeddings (the kernels that will run)
    against ``reference`` (the source's, unnormalised)."""
    from miaotui.encoder import Encoder, TruncationWarning
    from miaotui.eval.embeddings import evaluate_embeddings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        r = evaluate_embeddings(Encoder(loaded), reference, texts)
    return {k: r[k] for k in ("texts", "mean_cosine", "min_cosine", "similarity_spearman")}


def compress_encoder(args: argparse.Namespace, recipe: dict[str, Any], out: Path) -> int:
    """The encoder half of ``cli/compress.py``'s ``run``."""
    from miaotui.compress.recipe import Calibration, Context, run_recipe
    from miaotui.encoder import Encoder, TruncationWarning
    from miaotui.eval.embeddings import eval_texts
    from miaotui.loading.checkpoint import save_checkpoint, source_identity, update_quality
    from miaotui.loading.encoder import copy_pooling_files, load_encoder

    if args.export:
        raise MiaotuiError("--export hf is not available for encoders yet (the checkpoint loads with "
                           "Encoder(DIR) / miaotui embed --model DIR)")
    log = lambda s: print(f"[compress] {s}", file=sys.stderr, flush=True)  # noqa: E731
    loaded = load_encoder(args.model, "fp32", progress=sys.stderr.isatty())
    source_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in loaded.model.parameters()}.values())
    texts = reference = None
    if args.eval:
        texts, data = eval_texts(args.data)
        log(f"reference: the source's embeddings of {len(texts)} texts of {data.name}")
        with warnings.catch_warnings():  # paragraphs over the limit are cut for both sides alike
            warnings.simplefilter("ignore", TruncationWarning)
            reference = Encoder(loaded).encode(texts, normalize=False)
    ctx = Context(loaded, Calibration(args.calib, args.calib_samples, args.calib_len, args.seed), progress=True)
    if args.eval and len(recipe["steps"]) > 1:  # a chain: record what each step cost on the way
        ctx.step_eval = lambda le: embedding_quality(le, texts, reference)
    log(f"recipe {recipe['name']}: {json.dumps(recipe['steps'])}")
    records = run_recipe(ctx, recipe)
    manifest = save_checkpoint(out, loaded.model, loaded.tokenizer, loaded.config, ctx.modules,
                               {**recipe, "records": records}, source_identity(loaded.path))
    copy_pooling_files(loaded.path, out)
    log(f"wrote {out} ({manifest['weights']['bytes'] / 1e6:.1f} MB of weights)")
    quality = None
    if args.eval:
        quality = {**embedding_quality(loaded, texts, reference), "data": data.name, "reference": "source (fp32)"}
        update_quality(out, quality)
    bench = None
    if args.bench:
        from miaotui.encoder.bench import bench as run_bench

        source = str(loaded.path)
        del loaded
        bench_texts = (texts or eval_texts(args.data)[0])[:64]
        bench = run_bench(bench_texts, source, [f"miaotui:fp32@{source}", f"miaotui:fp32@{out}"], repeats=3,
                          threads=args.threads)
    print_encoder_report(manifest, quality, bench, source_bytes, args.json)
    return 0


def print_encoder_report(manifest: dict, quality: dict | None, bench: dict | None, source_bytes: int,
                         as_json: bool = False) -> dict:
    weights = manifest["weights"]["bytes"]
    name = manifest["recipe"].get("name", "?")
    result = {"recipe": name, "checkpoint_bytes": weights, "source_fp32_bytes": source_bytes,
              "bytes_ratio": weights / source_bytes, "quality": quality, "bench": bench}
    if not as_json:
        print(f"recipe {name}: {weights / 1e6:.1f} MB of weights, {100 * weights / source_bytes:.1f}% of the "
              f"fp32 source ({source_bytes / 1e6:.1f} MB)")
        if quality:
            print(f"embeddings vs source on {quality['texts']} texts of {quality['data']}: mean cosine "
                  f"{quality['mean_cosine']:.5f}, min {quality['min_cosine']:.5f}, similarity Spearman "
                  f"{quality['similarity_spearman']:.5f}")
        if bench:
            from miaotui.encoder.bench import table

            print(table(bench))
    print(json.dumps(result))
    return result
