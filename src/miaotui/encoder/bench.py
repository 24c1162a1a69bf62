"""Encoder throughput against the peers, in one process and one run: texts/s at batch 32 over all texts,
single-input latency over the first few, and each engine's mean cosine to the first engine (miaotui fp32).

Engines (comma-separated ``name:dtype``):

- ``miaotui:fp32``, ``miaotui:bf16``; ``@DIR`` runs one on another folder, e.g. a compressed checkpoint
  (``miaotui:fp32@out/w8a8``); ``+compile`` compiles its layer stack (``miaotui:fp32+compile``).
- ``st:fp32``, ``st:bf16``: sentence-transformers on PyTorch (its own tokenisation, sorting and pooling).
- ``ort:fp32``, ``ort:int8``: ONNX Runtime on the same weights, exported here with ``torch.onnx`` (cached in
  ``~/.cache/miaotui/onnx``); int8 is dynamic quantization with the settings of sentence-transformers'
  ``export_dynamic_quantized_onnx_model(..., "avx2")`` (optimum's ``AutoQuantizationConfig.avx2``: u8
  activations, symmetric per-channel u8 weights, full range), applied with ``onnxruntime.quantization``
  directly: sentence-transformers' own ONNX path needs ``optimum-onnx``, which pins transformers < 4.58.
  ``ort:int8-vnni`` uses the ``avx512_vnni`` settings instead (for CPUs that have VNNI).

A peer that is not installed (``pip install 'miaotui[peers]'``) is skipped with one line. Engines alternate
within each repeat, so load from other processes hits all of them alike; medians of the repeats.

    miaotui bench --model path/to/all-MiniLM-L6-v2 --engines miaotui:fp32,st:fp32,ort:int8
    python -m miaotui.encoder.bench --texts ../shared/data/wikitext2-test-excerpt.txt --threads 2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ENGINES = ("miaotui:fp32", "miaotui:bf16", "st:fp32", "st:bf16", "ort:fp32", "ort:int8")
ONNX_CACHE = Path.home() / ".cache" / "miaotui" / "onnx"  # exported models, one folder per weights hash
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
EncodeFn = Callable[[list[str], int], torch.Tensor]


class SkipEngine(Exception):
    """The engine cannot run here (a peer not installed, a format it cannot read): skipped with the reason."""


def _need(module: str, package: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise SkipEngine(f"{package} is not installed (pip install 'miaotui[peers]')")


def _source_folder(path: Path) -> Path:
    if (path / "manifest.json").is_file():
        raise SkipEngine("peers cannot read a miaotui checkpoint; give them the source folder")
    return path


# ---- miaotui
def miaotui_engine(path: Path | None, dtype: str, compile_: bool) -> EncodeFn:
    from miaotui.encoder import Encoder

    enc = Encoder(path, dtype=dtype, compile=compile_)
    return lambda texts, bs: enc.encode(texts, batch_size=bs, convert_to="tensor")


# ---- sentence-transformers (torch)
def st_engine(path: Path, dtype: str) -> EncodeFn:
    _need("sentence_transformers", "sentence-transformers")
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(_source_folder(path)), device="cpu").to(DTYPES[dtype]).eval()
    return lambda texts, bs: model.encode(texts, batch_size=bs, convert_to_tensor=True,
                                          show_progress_bar=False).float()


# ---- ONNX Runtime
ORT_INT8_CONFIGS = {  # optimum's AutoQuantizationConfig.<name>(is_static=False), as onnxruntime arguments
    "avx2": {"weight_type": "QUInt8", "per_channel": True, "reduce_range": False},
    "avx512_vnni": {"weight_type": "QInt8", "per_channel": True, "reduce_range": False},
}


class _Exportable(torch.nn.Module):
    """BertModel with the padding mask built in plain ops: transformers 5 builds it with data-dependent
    branches that ``torch.onnx`` traces into a graph that ignores the mask."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        h = self.model.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        bias = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
        return self.model.encoder(h, attention_mask=bias).last_hidden_state


def export_onnx(path: Path, int8: str | None = None, cache: Path | None = None) -> Path:
    """The folder's BertModel as ONNX (fp32, or int8 with ``ORT_INT8_CONFIGS[int8]``), cached by weights hash."""
    from miaotui.loading.checkpoint import source_identity

    cache = cache or ONNX_CACHE
    folder = cache / source_identity(path)["sha256"][:16]
    fp32 = folder / "model.onnx"
    if not fp32.is_file():
        from transformers import AutoModel

        folder.mkdir(parents=True, exist_ok=True)
        model = AutoModel.from_pretrained(str(path), attn_implementation="eager").eval()
        ids = torch.ones(2, 8, dtype=torch.long)
        mask = torch.ones_like(ids)
        mask[1, 5:] = 0
        names = ["input_ids", "attention_mask", "token_type_ids"]
        tmp = folder / "model.onnx.tmp"
        with torch.no_grad():
            torch.onnx.export(_Exportable(model), (ids, mask, torch.zeros_like(ids)), str(tmp), input_names=names,
                              output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                              dynamic_axes={n: {0: "batch", 1: "tokens"} for n in [*names, "last_hidden_state"]})
        tmp.rename(fp32)
    if int8 is None:
        return fp32
    out = folder / f"model_int8_{int8}.onnx"
    if not out.is_file():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        cfg = ORT_INT8_CONFIGS[int8]
        tmp = folder / f"model_int8_{int8}.tmp.onnx"
        quantize_dynamic(str(fp32), str(tmp), per_channel=cfg["per_channel"], reduce_range=cfg["reduce_range"],
                         weight_type=getattr(QuantType, cfg["weight_type"]),
                         extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
        tmp.rename(out)
    return out


def ort_engine(path: Path, dtype: str, threads: int) -> EncodeFn:
    _need("onnxruntime", "onnxruntime")
    _need("onnx", "onnx")
    import onnxruntime as ort

    from miaotui.loading.encoder import load_encoder

    ref = load_encoder(_source_folder(path))  # tokenizer, pooling and length limit, as our engines use
    if dtype not in ("fp32", "int8", "int8-vnni"):
        raise SkipEngine(f"ONNX Runtime runs fp32, int8 or int8-vnni here, not {dtype}")
    model = export_onnx(ref.path, {"fp32": None, "int8": "avx2", "int8-vnni": "avx512_vnni"}[dtype])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    tok, pooling, limit = ref.tokenizer, ref.pooling, ref.max_tokens
    if pooling.modes not in (("mean",), ("cls",)):
        raise SkipEngine(f"the ONNX Runtime engine pools mean or cls, not {pooling.modes}")

    def encode(texts: list[str], bs: int) -> torch.Tensor:
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # as sentence-transformers sorts
        out = np.empty((len(texts), ref.model.args.hidden_size), dtype=np.float32)
        for s in range(0, len(order), bs):
            idx = order[s:s + bs]
            b = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=limit, return_tensors="np",
                    return_token_type_ids=True)
            feed = {k: b[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
            h = session.run(None, feed)[0]
            if pooling.modes == ("cls",):
                e = h[:, 0]
            else:
                m = feed["attention_mask"][..., None].astype(np.float32)
                e = (h * m).sum(1) / m.sum(1)
            if pooling.normalize:
                e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
            out[idx] = e
        return torch.from_numpy(out)

    return encode


def make_engine(spec: str, model: str | Path | None, threads: int) -> EncodeFn:
    from miaotui.loading.encoder import default_encoder_path

    engine, _, where = spec.partition("@")
    name, _, dtype = engine.partition(":")
    compile_ = dtype.endswith("+compile")
    dtype = dtype.removesuffix("+compile") or "fp32"
    path = Path(where or model or default_encoder_path()).expanduser()
    if name == "miaotui":
        return miaotui_engine(path, dtype, compile_)
    if compile_:
        raise SkipEngine("+compile applies to miaotui engines only")
    if name == "st":
        return st_engine(path, dtype)
    if name == "ort":
        return ort_engine(path, dtype, threads)
    raise SkipEngine(f"unknown engine {name!r} (known: miaotui, st, ort)")


def bench(texts: list[str], model: str | Path | None = None, engines=ENGINES, batch: int = 32,
          single_texts: int = 16, repeats: int = 3, threads: int | None = None) -> dict:
    """texts/s at ``batch`` over all ``texts`` and at batch 1 over the first ``single_texts``; each engine's
    mean / min cosine to the first one that runs. Engines that cannot run are listed under ``skipped``."""
    import warnings

    warnings.filterwarnings("ignore", message=".*truncated")
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    runs: dict[str, EncodeFn] = {}
    skipped = []
    for spec in engines:
        try:
            runs[spec] = make_engine(spec, model, threads)
        except SkipEngine as e:
            skipped.append(f"{spec}: {e}")
            print(f"[bench] skipping {spec}: {e}", file=sys.stderr)
    if not runs:
        return {"texts": len(texts), "threads": threads, "results": {}, "skipped": skipped}
    single = texts[:single_texts]
    for fn in runs.values():  # warm-up (and compile, for +compile engines)
        fn(texts[:batch], batch)
        fn(single[:2], 1)
    times = {spec: {"batch": [], "single": []} for spec in runs}
    for _ in range(repeats):
        for spec, fn in runs.items():
            t0 = time.perf_counter()
            fn(texts, batch)
            times[spec]["batch"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for t in single:
                fn([t], 1)
            times[spec]["single"].append(time.perf_counter() - t0)
    embeddings = {spec: torch.nn.functional.normalize(fn(texts, batch).float(), dim=-1) for spec, fn in runs.items()}
    base = embeddings[next(iter(runs))]
    results = {}
    for spec in runs:
        cos = (embeddings[spec] * base).sum(-1)
        batch_s, single_s = statistics.median(times[spec]["batch"]), statistics.median(times[spec]["single"])
        results[spec] = {f"batch{batch}_per_s": len(texts) / batch_s, "batch1_per_s": len(single) / single_s,
                         "batch1_ms": 1000 * single_s / len(single), "mean_cosine_to_first": float(cos.mean()),
                         "min_cosine_to_first": float(cos.min())}
    return {"texts": len(texts), "threads": threads, "batch": batch, "single_texts": len(single),
            "repeats": repeats, "first": next(iter(runs)), "results": results, "skipped": skipped}


def table(res: dict) -> str:
    batch, first = res.get("batch", 32), res.get("first", "the first engine")
    lines = [f"| engine | batch {batch} texts/s | batch 1 ms | cosine to {first} (mean / min) |", "|---|---|---|---|"]
    for spec, r in res["results"].items():
        lines.append(f"| {spec} | {r[f'batch{batch}_per_s']:.1f} | {r['batch1_ms']:.1f} | "
                     f"{r['mean_cosine_to_first']:.5f} / {r['min_cosine_to_first']:.5f} |")
    lines += [f"(skipped {s})" for s in res.get("skipped", [])]
    return "\n".join(lines)


def header(res: dict) -> str:
    from miaotui.cpu import cpu_features

    return (f"{res['texts']} texts, {res['threads']} threads, {platform.processor() or platform.machine()} "
            f"({' '.join(cpu_features()) or 'features unknown'}), torch {torch.__version__}")


def run_cli(args: argparse.Namespace) -> int:
    """``miaotui bench --model ENCODER``: ``--engines`` (the decoder default becomes ``ENGINES``), ``--threads``,
    ``--repeats``, ``--data`` (one text per line; default the WikiText excerpt), ``--json``."""
    from miaotui.cli.bench import DEFAULT_ENGINES
    from miaotui.eval.embeddings import eval_texts

    engines = ENGINES if args.engines == DEFAULT_ENGINES else tuple(s.strip() for s in args.engines.split(",") if s.strip())
    texts, _ = eval_texts(args.data, limit=None)
    res = bench(texts, args.model, engines, repeats=args.repeats, threads=args.threads)
    if not args.json:
        print(header(res))
        print(table(res))
    print(json.dumps(res))
    return 0 if res["results"] else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--texts", help="one text per non-blank line (default: the WikiText excerpt's paragraphs)")
    p.add_argument("-m", "--model", help="encoder folder (default: all-MiniLM-L6-v2)")
    p.add_argument("--engines", default=",".join(ENGINES),
                   help="comma-separated name:dtype[+compile][@DIR] (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="threads for every engine (default: 2)")
    p.add_argument("--batch", type=int, default=32, help="batch size (default: 32)")
    p.add_argument("--single-texts", type=int, default=16, help="texts timed one at a time (default: 16)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats, median reported (default: 3)")
    args = p.parse_args(argv)
    from miaotui.eval.embeddings import eval_texts

    texts, _ = eval_texts(args.texts, limit=None)
    res = bench(texts, args.model, tuple(args.engines.split(",")), args.batch, args.single_texts, args.repeats,
                args.threads)
    print(header(res))
    print(table(res))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
