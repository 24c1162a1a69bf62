"""Flags shared by several verbs, and turning them into library objects."""

from __future__ import annotations

import argparse
import sys


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1, with a message that says so."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", metavar="PATH",
                   help="a Hugging Face model folder or a .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="compute dtype: fp32 (exact) or bf16 (half the weight bytes: faster decode; on CPUs without "
                        "AVX512-BF16/AMX long inputs are multiplied in fp32) (default: fp32)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for PyTorch (default: PyTorch's choice, the physical cores)")
    p.add_argument("--device", default="auto", metavar="DEV",
                   help="where to run: auto (a CUDA GPU when PyTorch sees one, else the CPU), cpu, cuda or "
                        "cuda:N (default: auto)")
    p.add_argument("--kv-cache-dtype", choices=["auto", "int8"], default="auto",
                   help="KV cache storage: auto (the model's dtype) or int8 (a scale per position and head; a "
                        "quarter of fp32's cache memory for long contexts and many sequences) (default: auto)")
    p.add_argument("--speculative", metavar="ngram|PATH",
                   help="speculative decoding of one stream: 'ngram' (prompt lookup: drafts copied from earlier "
                        "text; wins when the answer repeats the input: editing, summaries, code) or a smaller "
                        "draft model with the same tokenizer. Same output law, greedy output unchanged")
    p.add_argument("--num-speculative", type=int, default=5, metavar="K",
                   help="--speculative: tokens drafted per step (default: 5)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile, for models the fused native decode step "
                        "does not cover (Llama-family models with dense/int8/int4 weights decode natively, "
                        "compiled or not): 1.2-1.4x faster decode on a 2-core AVX2 CPU, but the first run "
                        "compiles for ~2 minutes (seconds afterwards, from the on-disk cache)")


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = 256) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("-n", "--max-tokens", type=int, default=max_tokens, metavar="N",
                   help=f"stop after N new tokens (default: {max_tokens}; capped by the context length)")
    g.add_argument("-t", "--temperature", type=float, default=0.8, metavar="T",
                   help="softmax temperature; 0 = greedy/argmax, deterministic (default: 0.8)")
    g.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="sample only among the K most likely tokens; 0 = off (default: 0)")
    g.add_argument("--top-p", type=float, default=0.95, metavar="P",
                   help="nucleus sampling: smallest set of tokens with cumulative probability >= P; 1 = off (default: 0.95)")
    g.add_argument("--min-p", type=float, default=0.0, metavar="P",
                   help="drop tokens less likely than P x the most likely one; 0 = off (default: 0)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                   help="divide the logits of tokens already seen by R (>1 discourages repeats); 1 = off (default: 1)")
    g.add_argument("--seed", type=int, metavar="S", help="random seed: the same seed reproduces the same output")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when TEXT is generated (not included in the output); repeatable")
    g.add_argument("--ignore-eos", action="store_true",
                   help="keep generating past the end-of-sequence token (for benchmarking)")


def sampling_params(args: argparse.Namespace):
    from miaotui.config import SamplingParams

    return SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed, max_tokens=args.max_tokens,
        stop=tuple(args.stop), ignore_eos=args.ignore_eos,
    )


def load_llm(args: argparse.Namespace):
    import torch

    from miaotui.llm import LLM

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dtype == "bf16":
        from miaotui.cpu import has_native_bf16

        if has_native_bf16() is False:
            print("miaotui: note: this CPU has no AVX512-BF16/AMX: one-token decode uses emulated bf16, "
                  "prompts and batches are multiplied in fp32", file=sys.stderr)
    return LLM(args.model, dtype=args.dtype, progress=sys.stderr.isatty(), compile=args.compile,
               kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"), device=getattr(args, "device", "auto"),
               speculative=getattr(args, "speculative", None), num_speculative=getattr(args, "num_speculative", 5))
