"""Generate text from a prompt, streaming it to stdout as it is produced.

examples:
  miaotui generate "The capital of France is" --temperature 0
  miaotui generate --chat "Write a haiku about CPUs" --seed 1
  echo "Once upon a time" | miaotui generate --max-tokens 64 --json
"""

from __future__ import annotations

import argparse
import json
import sys

from miaotui.cli.common import add_model_args, add_sampling_args, load_llm, sampling_params


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help="the prompt (default: read from stdin)")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--chat", action="store_true",
                   help="treat the prompt as a user message and apply the model's chat template")
    p.add_argument("--system", metavar="TEXT", help="system message for --chat")
    p.add_argument("--json", action="store_true",
                   help="after the streamed text, print one JSON line with the text, token counts, "
                        "finish_reason, ttft_s, prefill_tok_s and decode_tok_s")


def run(args: argparse.Namespace) -> int:
    from miaotui.config import GenerationStats
    from miaotui.errors import MiaotuiError
    from miaotui.parallel import launch

    if launch.is_follower():  # under torchrun, ranks > 0 replay rank 0's forwards; rank 0 reads and prints
        return launch.follow(args.model, args.dtype, args.threads)
    prompt = args.prompt
    if prompt is None:
        if sys.stdin.isatty():
            raise MiaotuiError("no prompt: pass one as an argument or pipe it on stdin")
        prompt = sys.stdin.read()
    if not prompt.strip() and not args.chat:
        raise MiaotuiError("empty prompt")
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        prompt = messages + [{"role": "user", "content": prompt}]
    params = sampling_params(args)
    llm = launch.lead(args.model, args.dtype, args.threads) if launch.tp_active() else load_llm(args)
    stats = GenerationStats()
    parts = []
    for delta in llm.stream(prompt, params, stats):
        parts.append(delta)
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.json:
        from miaotui.llm import Completion

        record = Completion("".join(parts), stats).to_dict()
        record["compile_s"] = round(llm.runner.compile_s, 3)  # one-off, excluded from decode_tok_s
        if "spec" in stats.extra:
            record["speculative"] = stats.extra["spec"]
        print(json.dumps(record, ensure_ascii=False))
    else:
        print(f"[{stats.prompt_tokens} prompt + {stats.completion_tokens} new tokens, "
              f"ttft {stats.ttft_s * 1000:.0f} ms, prefill {stats.prefill_tok_s:.0f} tok/s, "
              f"decode {stats.decode_tok_s:.1f} tok/s, finish: {stats.finish_reason}"
              + (f", compile {llm.runner.compile_s:.1f} s" if llm.runner.compiled else "")
              + (f", drafts accepted {spec['accepted']}/{spec['proposed']} in {spec['target_forwards']} forwards"
                 if (spec := stats.extra.get("spec")) else "") + "]", file=sys.stderr)
    return 0
