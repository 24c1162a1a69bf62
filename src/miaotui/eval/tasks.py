"""Task accuracy. LAMBADA (OpenAI's ``lambada_test.jsonl`` form): predict a passage's last word.

An item counts as correct when greedy decoding from the context would produce exactly the target word's
tokens: each target token is the argmax given the context and the target tokens before it (teacher forced,
which is the same thing, in one forward pass). As in lm-evaluation-harness's ``lambada_openai``, the target is
" " + the last space-separated word; the task perplexity is exp(mean over items of the target's total NLL).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from miaotui.errors import MiaotuiError
from miaotui.eval.data import bos_id, tokenize
from miaotui.eval.perplexity import no_kv_cache
from miaotui.models import CausalLM

TASKS = ("lambada",)


class TaskDataError(MiaotuiError):
    """A task file is missing or not in the expected format."""


@dataclass
class TaskResult:
    name: str
    accuracy: float
    perplexity: float
    n: int

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "perplexity": self.perplexity, "n": self.n}


def read_lambada(path: str | Path, limit: int | None = None) -> list[tuple[str, str]]:
    """(context, " " + last word) per line of ``{"text": ...}`` JSON."""
    path = Path(path)
    if not path.is_file():
        raise TaskDataError(f"{path}: no such file")
    items = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise TaskDataError(f"{path}:{i}: expected a JSON object with a \"text\" field per line "
                                f"(LAMBADA's lambada_test.jsonl form)") from None
        if not isinstance(text, str) or " " not in text.strip():
            raise TaskDataError(f"{path}:{i}: the text needs a context and a last word separated by a space")
        context, word = text.strip().rsplit(" ", 1)
        items.append((context, " " + word))
        if limit and len(items) >= limit:
            break
    if not items:
        raise TaskDataError(f"{path}: no items")
    return items


def encode_item(tokenizer, context: str, target: str) -> tuple[list[int], int]:
    """Token ids of context+target and how many of them are the target's."""
    whole = tokenize(tokenizer, context + target)
    ctx_ids = tokenize(tokenizer, context)
    if whole[:len(ctx_ids)] != ctx_ids or len(whole) == len(ctx_ids):  # a merge across the boundary
        whole = ctx_ids + tokenize(tokenizer, target)
    bos = bos_id(tokenizer)
    prefix = [bos] if bos is not None else []
    return prefix + whole, len(whole) - len(ctx_ids)


def target_scores(model: CausalLM, batch: list[tuple[list[int], int]]) -> list[tuple[bool, float]]:
    """(greedy match, target NLL) per item; items are right-padded (causal attention never sees the pad)."""
    t = max(len(ids) for ids, _ in batch)
    ids = torch.zeros(len(batch), t, dtype=torch.long)
    for i, (seq, _) in enumerate(batch):
        ids[i, :len(seq)] = torch.tensor(seq)
    # only the rows that predict a target token: positions len-n-1 .. len-2 of each item
    wanted = sorted({p for seq, n in batch for p in range(len(seq) - n - 1, len(seq) - 1)})
    where = {p: j for j, p in enumerate(wanted)}
    device = next(model.parameters()).device
    with torch.inference_mode(), no_kv_cache(model):
        logits = model(ids.to(device), 0, logit_rows=torch.tensor(wanted, device=device)).cpu()
    out = []
    for i, (seq, n) in enumerate(batch):
        rows = torch.tensor([where[p] for p in range(len(seq) - n - 1, len(seq) - 1)])
        lp = torch.log_softmax(logits[i, rows].double(), -1)  # (n, V)
        target = torch.tensor(seq[len(seq) - n:])
        nll = -lp.gather(1, target[:, None]).sum().item()
        out.append((bool(torch.equal(lp.argmax(-1), target)), nll))
    return out


def lambada(model: CausalLM, tokenizer, items: list[tuple[str, str]], batch_size: int = 8,
            progress: bool = False) -> TaskResult:
    from tqdm import tqdm

    encoded = [encode_item(tokenizer, c, t) for c, t in items]
    limit = model.max_seq_len
    encoded = [(seq[-limit:], n) for seq, n in encoded]  # keep the end: the target and its nearest context
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # similar lengths pad less
    results: list = [None] * len(encoded)
    with tqdm(total=len(order), desc="lambada", unit="item", disable=not progress, leave=False) as bar:
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            for i, r in zip(idx, target_scores(model, [encoded[i] for i in idx])):
                results[i] = r
            bar.update(len(idx))
    acc = sum(ok for ok, _ in results) / len(results)
    ppl = math.exp(sum(nll for _, nll in results) / len(results))
    return TaskResult("lambada", acc, ppl, len(results))


def run_task(name: str, path: str | Path, model: CausalLM, tokenizer, limit: int | None = None,
             progress: bool = False) -> TaskResult:
    if name != "lambada":
        raise TaskDataError(f"unknown task {name!r} (available: {', '.join(TASKS)})")
    return lambada(model, tokenizer, read_lambada(path, limit), progress=progress)
