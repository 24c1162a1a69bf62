"""``miaotui <verb>``: one entry point; each verb module has ``add_args()`` and ``run()`` and imports
its heavy dependencies only inside ``run()`` so ``--help`` stays instant."""

from __future__ import annotations

import argparse
import importlib
import sys

# verb → (module, one-line help)
VERBS = {
    "generate": ("miaotui.cli.generate", "generate text from a prompt (streams to stdout)"),
    "chat": ("miaotui.cli.chat", "interactive chat with streaming answers"),
    "inspect": ("miaotui.cli.inspect", "show a model's architecture, size, dtypes, context and tokenizer"),
    "bench": ("miaotui.cli.bench", "benchmark prefill/TTFT/decode against transformers and llama.cpp"),
    "compress": ("miaotui.cli.compress", "quantize a model with a recipe (int8, int4 RTN/GPTQ/AWQ, W8A8) into a checkpoint"),
    "eval": ("miaotui.cli.eval", "perplexity, KL divergence and top-1 agreement vs a reference; task accuracy"),
    "serve": ("miaotui.cli.serve", "serve a model behind an OpenAI-compatible HTTP API (FastAPI, SSE streaming)"),
    "embed": ("miaotui.cli.embed", "sentence embeddings with a BERT-family encoder (.npy or .jsonl)"),
    "distill": ("miaotui.cli.distill", "train a smaller or compressed student to imitate its original (decoders, encoders)"),
    "fill-mask": ("miaotui.cli.fill_mask", "fill in [MASK] tokens with a masked-LM encoder"),
    "classify": ("miaotui.cli.classify", "classify texts with a sequence-classification encoder"),
    "optimize": ("miaotui.cli.optimize", "search recipes for the fastest checkpoint within a quality budget (ppl+3%%, kld<=0.02)"),
}


def build_parser() -> argparse.ArgumentParser:
    from miaotui import __version__

    parser = argparse.ArgumentParser(prog="miaotui", description="miaotui (秒推): fast LLM inference on CPU.")
    parser.add_argument("--version", action="version", version=f"miaotui {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb, (module, help_text) in VERBS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(verb, help=help_text, description=(mod.__doc__ or help_text).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_args(p)
        p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
        p.set_defaults(run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from miaotui.errors import MiaotuiError

    try:
        return args.run(args) or 0
    except MiaotuiError as e:
        if args.debug:
            raise
        print(f"miaotui {args.verb}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `miaotui generate ... | head`
        return 0
