"""Chat with a model interactively; answers stream as they are generated.

Commands inside the chat: /reset forgets the conversation, /exit (or Ctrl-D) quits.
When the conversation outgrows the context, the oldest turns are dropped (with a notice).
"""

from __future__ import annotations

import argparse
import sys

from miaotui.cli.common import add_model_args, add_sampling_args, load_llm, sampling_params


def add_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_sampling_args(p, max_tokens=512)
    p.add_argument("--system", metavar="TEXT", help="system message that starts every conversation")


def _read(prompt: str) -> str | None:
    try:
        return input(prompt)
    except EOFError:
        return None


def run(args: argparse.Namespace) -> int:
    from miaotui.errors import PromptTooLongError
    from miaotui.loading.tokenizer import render_chat

    params = sampling_params(args)
    llm = load_llm(args)
    render_chat(llm.tokenizer, [{"role": "user", "content": "hi"}])  # fail now if there is no template
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"miaotui chat — {llm.loaded.path.name}. /reset to start over, /exit to quit.", file=sys.stderr)
    while True:
        line = _read(">>> " if interactive else "")
        if line is None or line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            history.clear()
            print("(conversation reset)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        while True:
            try:
                deltas = llm.stream(system + history, params)
                answer = []
                for delta in deltas:
                    answer.append(delta)
                    sys.stdout.write(delta)
                    sys.stdout.flush()
                break
            except PromptTooLongError:
                if len(history) <= 1:
                    raise
                history = history[2:] if len(history) > 2 else history[1:]
                print("(context full: dropped the oldest turn)", file=sys.stderr)
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(answer)})
