"""Benchmark latency against the peers, on the same weights, prompts, threads and machine, in one run.

Each engine runs in its own process (its own peak RSS, no shared thread pool or compile cache), warms up,
then every figure is the median of --repeats runs: prefill tok/s per prompt length (empty cache, no
prefix reuse), TTFT at 512 tokens, batch-1 decode tok/s ((N-1) / (t(N) - t(1)), EOS ignored). The roofline
is measured read bandwidth / weight bytes per token. Throughput: --concurrency requests submitted at once,
aggregate generated tok/s (miaotui: continuous batching; transformers: a padded static batch). Ends with
one JSON line.

engines: miaotui:fp32, miaotui:bf16 (append @PATH to run one on another model, e.g. a compressed checkpoint:
miaotui:fp32@out/int4; append +compile to compile one of them, e.g. miaotui:bf16+compile, to
compare compiled and eager in one run), hf:fp32, hf:bf16 (transformers `generate`), llama.cpp (the GGUF file
through llama-cpp-python; install the `peers` extra, skipped with a note when absent), llama.cpp:f32 (an F32
copy of the GGUF, written once with the gguf package: the same weights as miaotui:fp32).

--rounds N runs the engine list N times in rotated order and keeps each figure's median over the rounds
(bench/rounds.py): on a shared machine whose bandwidth drifts, that keeps the ratios between engines steady.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from miaotui.bench.rounds import run_rounds
from miaotui.cli.common import positive_int
from miaotui.errors import MiaotuiError

DEFAULT_ENGINES = "miaotui:fp32,miaotui:bf16,hf:fp32,hf:bf16,llama.cpp,llama.cpp:f32"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("mode", nargs="?", choices=["engines", "serve", "speculative"], default="engines",
                   help="engines: compare engines in-process (default); serve: load a running server at --url "
                        "(TTFT/TPOT/ITL/E2E percentiles, throughput, failures); speculative: plain greedy decode "
                        "vs prompt lookup (and --draft) on an input-grounded task, same output required")
    p.add_argument("-m", "--model", metavar="PATH",
                   help="HF folder or .gguf file (default: the embedded SmolLM2-135M-Instruct); an encoder folder "
                        "(BERT family) runs the encoder bench: texts/s at batch 32 and batch-1 latency on --data")
    p.add_argument("--engines", default=DEFAULT_ENGINES,
                   help=f"comma-separated engines to compare (default: {DEFAULT_ENGINES}; for an encoder: "
                        "miaotui:fp32,miaotui:bf16,st:fp32,st:bf16,ort:fp32,ort:int8, and miaotui:fp32@DIR for a "
                        "compressed checkpoint)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), metavar="N",
                   help="threads for every engine (default: all cores, %(default)s here)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="compile miaotui's decode step with torch.compile where the fused native step does not "
                        "cover the model (it does for Llama-family models with dense/int8/int4 weights: engine "
                        "names say 'native step'); default: on; the one-off compile time is reported apart")
    p.add_argument("--prefill", default="128,512,2048", metavar="N,N,...",
                   help="prompt lengths for prefill (default: 128,512,2048)")
    p.add_argument("--decode-tokens", type=int, default=128, metavar="N",
                   help="new tokens for the decode measurement (default: 128)")
    p.add_argument("--repeats", type=int, default=3, metavar="N", help="runs per figure; the median is kept (default: 3)")
    p.add_argument("--rounds", type=positive_int, default=1, metavar="N",
                   help="run the engine list N times, each round in a rotated order, and keep each figure's median "
                        "over the rounds: engines measured in alternation see the same spread of a shared machine's "
                        "speed, so their ratios hold still (default: 1; the encoder bench alternates its engines "
                        "within each repeat already)")
    p.add_argument("--concurrency", default="8,32", metavar="N,N,...",
                   help="throughput: submit N requests at once (mixed prompt 32-256 / output 32-128 tokens) and "
                        "report aggregate tok/s; '' skips it (default: 8,32)")
    p.add_argument("--data", metavar="FILE", help="text to cut prompts from (default: the WikiText excerpt)")
    p.add_argument("--plot", metavar="FILE.png", help="write a bar chart of decode and prefill speed")
    p.add_argument("--json", action="store_true", help="print only the final JSON line on stdout")
    g = p.add_argument_group("speculative mode")
    g.add_argument("--num-speculative", type=int, default=5, metavar="K", help="tokens drafted per step (default: 5)")
    g.add_argument("--draft", metavar="PATH", help="also measure a draft model with the same tokenizer")
    g.add_argument("--spec-max-tokens", type=int, default=256, metavar="N",
                   help="new tokens at most (the answer usually ends earlier, at EOS) (default: 256)")
    from miaotui.bench.serve_load import add_serve_args

    add_serve_args(p)
    p.add_argument("--tp", metavar="N,N,...",
                   help="compare tensor-parallel sizes instead of engines: TP=1 with all --threads in one process "
                        "vs N torchrun ranks splitting them (fp32, eager); decode/prefill tok/s, weights per rank")


def _cannot_run(spec: str, model: str | None) -> str | None:
    model = spec.partition("@")[2] or model
    if spec.startswith("hf") and model and (Path(model) / "manifest.json").is_file():
        return "transformers cannot load a miaotui checkpoint (write one it can with compress --export hf)"
    if spec.startswith("llama.cpp"):
        if importlib.util.find_spec("llama_cpp") is None:
            return "llama-cpp-python is not installed (pip install 'miaotui[peers]')"
        if model and not model.endswith(".gguf"):
            return "llama.cpp runs GGUF files only; this model is not one"
    return None


DECODE_PROMPT = 32  # tokens of prompt before the decode measurement


def _write_prompts(args: argparse.Namespace, lengths: list[int], path: Path) -> None:
    """Token ids made once, here, so every engine gets exactly the same prompts."""
    from miaotui.bench.prompts import prompt_ids
    from miaotui.loading import default_model_path
    from miaotui.loading.gguf_tokenizer import load_gguf_tokenizer
    from miaotui.loading.tokenizer import load_hf_tokenizer

    model = Path(args.model) if args.model else default_model_path()
    tok = load_hf_tokenizer(model) if model.is_dir() else load_gguf_tokenizer(model)
    from miaotui.bench.throughput import PROMPT_LENGTHS

    needed = {DECODE_PROMPT, *lengths, *(PROMPT_LENGTHS if args.concurrency else ())}
    prompts = {n: prompt_ids(tok, n, args.data) for n in sorted(needed)}
    path.write_text(json.dumps({"prompts": prompts, "prefill": lengths, "decode_prompt": DECODE_PROMPT}))


def _run_engine(spec: str, args: argparse.Namespace, prompts: Path) -> dict | None:
    spec, _, model = spec.partition("@")  # miaotui:fp32@DIR: this engine on another model (a checkpoint)
    model = model or args.model
    compile_it = spec.startswith("miaotui") and (args.compile or spec.endswith("+compile"))
    spec = spec.removesuffix("+compile")
    cmd = [sys.executable, "-m", "miaotui.bench.worker", spec, "--threads", str(args.threads),
           "--prompts", str(prompts), "--decode-tokens", str(args.decode_tokens), "--repeats", str(args.repeats)]
    cmd += ["--model", model] if model else []
    cmd += ["--concurrency", args.concurrency] if args.concurrency else []
    cmd += ["--compile"] if compile_it else []
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True)
    if proc.returncode != 0:
        print(f"[bench] {spec} failed (exit {proc.returncode}); see its output above", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def collect(args: argparse.Namespace) -> dict:
    """Run every engine of ``args.engines`` in its own process; the summary that ``--json`` prints."""
    import torch

    from miaotui.bench.roofline import measure_read_bandwidth

    torch.set_num_threads(args.threads)
    bandwidth = measure_read_bandwidth()
    lengths = args.prefill.split(",")
    try:
        ints = [int(n) for n in lengths]
    except ValueError:
        raise MiaotuiError(f"--prefill wants comma-separated token counts, got {args.prefill!r}") from None
    workdir = Path(tempfile.mkdtemp(prefix="miaotui-bench-"))
    prompts = workdir / "prompts.json"
    _write_prompts(args, ints, prompts)
    specs, skipped = [], []
    for spec in [s.strip() for s in args.engines.split(",") if s.strip()]:
        reason = _cannot_run(spec, args.model)
        if reason:
            skipped.append(f"{spec}: {reason}")
            print(f"[bench] skipping {skipped[-1]}", file=sys.stderr)
        else:
            specs.append(spec)
    results = run_rounds(specs, args.rounds, lambda spec: _run_engine(spec, args, prompts),
                         log=lambda s: print(f"[bench] {s}", file=sys.stderr, flush=True))
    from miaotui.cpu import cpu_features

    return {"bandwidth_gb_s": bandwidth / 1e9, "threads": args.threads, "torch": torch.__version__,
            "cpu_features": cpu_features(), "prefill_lengths": lengths, "rounds": args.rounds, "results": results,
            "skipped": skipped}


def run(args: argparse.Namespace) -> int:
    from miaotui.loading.encoder import is_encoder_folder

    if args.mode == "engines" and args.model and is_encoder_folder(Path(args.model).expanduser()):
        from miaotui.encoder.bench import run_cli  # encoders: texts/s vs sentence-transformers and ONNX Runtime

        return run_cli(args)
    if args.tp:
        from miaotui.bench.tp import run_tp

        return run_tp(args)
    if args.mode == "speculative":
        return _run_speculative(args)
    if args.mode == "serve":
        from miaotui.bench import serve_load

        return serve_load.run(args)
    from miaotui.bench.report import plot, table

    summary = collect(args)
    results, lengths, bandwidth = summary["results"], summary["prefill_lengths"], summary["bandwidth_gb_s"] * 1e9
    if not args.json:
        print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s, {args.threads} threads, torch {summary['torch']}, "
              f"CPU features: {' '.join(summary['cpu_features']) or 'unknown'}")
        print(table(results, bandwidth, lengths, args.concurrency.split(",") if args.concurrency else []))
    if args.plot and results:
        plot(results, args.plot, lengths)
    print(json.dumps(summary))
    return 0 if results else 1


def _run_speculative(args: argparse.Namespace) -> int:
    import torch

    from miaotui.bench import speculative

    torch.set_num_threads(args.threads)
    summary = speculative.measure(args.model, args.data, args.spec_max_tokens, args.num_speculative, args.draft,
                                  args.compile, args.repeats)
    summary["threads"] = args.threads
    if not args.json:
        print(speculative.table(summary))
    print(json.dumps(summary))
    return 0 if all(r["same_output"] for r in summary["results"]) else 1
