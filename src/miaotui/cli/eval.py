"""Measure what a model (often a compressed one) lost: perplexity over non-overlapping windows of --ctx
tokens and, against a reference (a path, or `default` for the embedded model, in fp32), mean and p99 KL
divergence and top-1 agreement, as llama.cpp's `perplexity --kl-divergence` defines them (the second half
of each window is scored). --task lambada adds last-word accuracy.

Reference logits can be saved once and reused: --reference-logits FILE reads FILE when it exists and
otherwise computes it from --reference and writes it (`auto`: a file in ~/.cache/miaotui/eval keyed by
reference, data, ctx and windows). A file made for another model, data or ctx is refused.

examples:
  miaotui eval --model int4-dir --reference default --task lambada
  miaotui eval --model int4-dir --reference-logits ref.safetensors --json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from miaotui.errors import MiaotuiError

DEFAULT_CTX = 512
DEFAULT_WINDOWS = 20


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", metavar="PATH",
                   help="model to evaluate: HF folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="compute dtype of the evaluated model (default: fp32); the reference is always fp32")
    p.add_argument("-r", "--reference", metavar="PATH|default",
                   help="reference model for KLD and top-1 (`default`: the embedded model)")
    p.add_argument("--reference-logits", metavar="FILE|auto",
                   help="reuse the reference's saved log-probs from FILE, or compute them from --reference and "
                        "save them there when FILE does not exist (`auto`: a cache file keyed by reference, data, "
                        "ctx and windows); ~25 MB per 512-token window for a 49k vocabulary")
    p.add_argument("--save-reference", metavar="FILE",
                   help="compute the reference log-probs from --reference, write them to FILE (overwriting it), "
                        "and evaluate against them")
    p.add_argument("--data", metavar="FILE", help="text to evaluate on (default: the shared WikiText excerpt)")
    p.add_argument("--ctx", type=int, metavar="N",
                   help=f"tokens per window (default: {DEFAULT_CTX}, or the reference file's)")
    n = p.add_mutually_exclusive_group()
    n.add_argument("--windows", type=int, metavar="N",
                   help=f"evaluate the first N windows; 0 = all the data holds (default: {DEFAULT_WINDOWS}, "
                        "or all of a reused reference file's; an encoder: the first N lines of --data, default 256)")
    n.add_argument("--max-tokens", type=int, metavar="N", help="evaluate as many whole windows as fit in N tokens")
    p.add_argument("--score-from", type=int, metavar="N",
                   help="first scored logit row of each window (default: ctx/2, as llama.cpp: every scored token "
                        "then sees at least ctx/2 tokens of context)")
    p.add_argument("--task", nargs="+", metavar=("NAME", "FILE"),
                   help="also run a task: `lambada [FILE]` (last-word accuracy; default FILE: the shared "
                        "lambada_openai_test_first300.jsonl)")
    p.add_argument("--task-limit", type=int, metavar="N", help="evaluate only the task's first N items")
    p.add_argument("--batch-size", type=int, metavar="N",
                   help="windows per forward pass (default: as many as make ~1024 tokens)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for PyTorch (default: PyTorch's choice)")
    p.add_argument("--json", action="store_true",
                   help="print the table on stderr and end stdout with one JSON line (perplexity, kld_mean, "
                        "kld_p99, top1_agreement, task accuracy, ...)")


def _task(args) -> tuple[str, Path] | None:
    if not args.task:
        return None
    if len(args.task) > 2:
        raise MiaotuiError("--task takes a name and at most one file, e.g. --task lambada FILE")
    name = args.task[0]
    if len(args.task) == 2:
        return name, Path(args.task[1])
    from miaotui.bench.prompts import default_data_file

    data = default_data_file()
    path = data.parent / "lambada_openai_test_first300.jsonl" if data else None
    if name != "lambada" or path is None or not path.is_file():
        raise MiaotuiError(f"--task {name} needs a FILE (no default file found)")
    return name, path


def _n_windows(args, ctx: int) -> int | None:
    """The windows asked for: None when left to the default."""
    if args.max_tokens is not None:
        if args.max_tokens < ctx:
            raise MiaotuiError(f"--max-tokens {args.max_tokens} is less than one window of --ctx {ctx}")
        return args.max_tokens // ctx
    if args.windows is not None and args.windows < 0:
        raise MiaotuiError("--windows must be 0 (all) or more")
    return args.windows


def _load(path, dtype: str, progress: bool):
    from miaotui.engine.prepare import prepare_for_inference
    from miaotui.loading import load

    loaded = load(path, dtype, progress=progress)
    prepare_for_inference(loaded.model)  # fused projections: same math, faster
    return loaded


def _reference(args, loaded, progress: bool):
    """(reference for ``evaluate``, data for ``evaluate``, ctx, windows, data label)."""
    from miaotui.defaults import default_model_path
    from miaotui.eval import reference as R
    from miaotui.eval.data import default_data_path, text_windows
    from miaotui.eval.perplexity import default_first

    ref_path = None
    if args.reference:
        ref_path = default_model_path() if args.reference == "default" else Path(args.reference).expanduser()
        if not ref_path.exists():
            raise MiaotuiError(f"--reference {ref_path}: no such file or directory")
    file = args.save_reference or args.reference_logits
    if file and file != "auto" and Path(file).exists() and not args.save_reference:
        ref = R.ReferenceLogits.load(file)
        source = f"the reference logits in {file}"
        if ref_path is not None:
            ref.check(fingerprint=R.model_fingerprint(ref_path), source=source)
        ref.check(ctx=args.ctx, first=args.score_from, source=source)
        n = _n_windows(args, ref.windows.shape[1]) or None
        if args.data is None:
            if n:
                ref = ref.subset(n)
            return ref, None, ref.windows.shape[1], n, ref.meta.get("data") or "reference windows"
        return ref, args.data, ref.windows.shape[1], n or ref.windows.shape[0], Path(args.data).name

    ctx = args.ctx or DEFAULT_CTX
    n = _n_windows(args, ctx)
    n = DEFAULT_WINDOWS if n is None else n
    data_label = Path(args.data).name if args.data else default_data_path().name
    if ref_path is None:
        if file:
            raise MiaotuiError(f"{file} does not exist yet: give --reference to compute it")
        return None, args.data, ctx, n, data_label
    windows, sha = text_windows(loaded.tokenizer, args.data, ctx, n)
    first = default_first(ctx) if args.score_from is None else args.score_from
    print(f"miaotui eval: loading the reference {ref_path.name} (fp32)", file=sys.stderr)
    ref_loaded = _load(ref_path, "fp32", progress)
    if not file:
        return ref_loaded, windows, ctx, n, data_label
    fingerprint = R.model_fingerprint(ref_path)
    path = Path(file)
    if file == "auto":
        path = R.default_cache_path(R.cache_key(fingerprint, sha, ctx, first, windows.shape[0]))
        if path.exists():
            print(f"miaotui eval: reusing reference logits {path}", file=sys.stderr)
            return R.ReferenceLogits.load(path).check_windows(windows, str(path)), windows, ctx, n, data_label
    meta = {"reference": ref_path.name, "fingerprint": fingerprint, "data": data_label, "data_sha256": sha}
    ref = R.compute_reference(ref_loaded.model, windows, first, meta=meta, batch_size=args.batch_size, progress=progress)
    ref.save(path)
    print(f"miaotui eval: saved reference logits to {path} ({path.stat().st_size / 2**20:.0f} MiB)", file=sys.stderr)
    return ref, windows, ctx, n, data_label


def run(args: argparse.Namespace) -> int:
    import torch

    from miaotui.defaults import default_model_path
    from miaotui.eval.evaluate import evaluate

    if args.threads:
        torch.set_num_threads(args.threads)
    progress = sys.stderr.isatty()
    task = _task(args)
    model_path = Path(args.model).expanduser() if args.model else default_model_path()

    if _is_encoder(model_path):  # BERT-style: embedding cosine and similarity-rank correlation instead
        return _run_encoder(args, model_path)

    loaded = _load(model_path, args.dtype, progress)
    reference, data, ctx, n, data_label = _reference(args, loaded, progress)
    try:
        report = evaluate(loaded, data, reference=reference, ctx=ctx, windows=n, first=args.score_from,
                          task=task, task_limit=args.task_limit, batch_size=args.batch_size, progress=progress)
    except ValueError as e:  # e.g. a vocabulary that does not match the reference's
        raise MiaotuiError(str(e)) from None
    report.data = data_label
    out = sys.stderr if args.json else sys.stdout
    print(report.table(), file=out)
    if args.json:
        print(json.dumps(report.to_dict()))
    return 0


ENCODER_TYPES = ("bert", "roberta", "xlm-roberta")


def _is_encoder(path: Path) -> bool:
    cfg = path / "config.json"
    if not (path.is_dir() and cfg.is_file()):
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") in ENCODER_TYPES
    except (OSError, json.JSONDecodeError):
        return False


def _run_encoder(args: argparse.Namespace, model_path: Path) -> int:
    """Encoder quality against a reference encoder on the lines of ``--data`` (one text per line)."""
    from miaotui.encoder import Encoder
    from miaotui.encoder.io import read_texts
    from miaotui.eval.data import default_data_path
    from miaotui.eval.embeddings import evaluate_embeddings
    from miaotui.loading.encoder import default_encoder_path

    if not args.reference:
        raise MiaotuiError("evaluating an encoder needs --reference PATH (or 'default': all-MiniLM-L6-v2)")
    ref_path = default_encoder_path() if args.reference == "default" else Path(args.reference).expanduser()
    data = Path(args.data) if args.data else default_data_path()
    texts = [t for t in read_texts(data) if len(t.split()) >= 4][: args.windows or 256]
    if len(texts) < 2:
        raise MiaotuiError(f"{data}: need at least two non-blank lines of text to compare embeddings")
    result = evaluate_embeddings(Encoder(model_path, dtype=args.dtype), Encoder(ref_path), texts,
                                 batch_size=args.batch_size or 32)
    result.update(model=str(model_path), reference=str(ref_path), data=data.name)
    out = sys.stderr if args.json else sys.stdout
    print(f"{model_path.name} vs {ref_path.name} on {result['texts']} texts of {data.name}: mean cosine "
          f"{result['mean_cosine']:.6f}, min cosine {result['min_cosine']:.6f}, similarity Spearman "
          f"{result['similarity_spearman']:.6f}", file=out)
    if args.json:
        print(json.dumps(result))
    return 0
