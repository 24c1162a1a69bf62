"""``evaluate()``: the library entry point, for the CLI and for in-process use by compress/optimize.

Only ``model.forward`` is called, so a model whose linears were swapped for quantized/pruned ones is
evaluated as it runs, without reloading. Example::

    ref = compute_reference(original.model, windows)      # once, before compressing (or save/load it)
    ... compress original.model in place ...
    report = evaluate(original, windows, reference=ref)   # PPL, KLD mean/p99, top-1
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import torch

from miaotui.eval.data import text_windows, token_windows
from miaotui.eval.perplexity import default_first, score_windows, summarize
from miaotui.eval.reference import ModelReference, ReferenceLogits
from miaotui.eval.report import EvalReport
from miaotui.eval.tasks import run_task
from miaotui.models import CausalLM


def _unwrap(model) -> tuple[CausalLM, object, str]:
    """(CausalLM, tokenizer or None, display name) of a LoadedModel or a bare CausalLM."""
    if isinstance(model, CausalLM):
        return model, None, type(model).__name__
    return model.model, model.tokenizer, Path(model.path).name


def evaluate(model, data: str | Path | Sequence[int] | torch.Tensor | None = None, *, tokenizer=None,
             reference=None, ctx: int = 512, windows: int | None = None, first: int | None = None,
             task: tuple[str, str | Path] | None = None, task_limit: int | None = None,
             batch_size: int | None = None, progress: bool = False, name: str | None = None) -> EvalReport:
    """Perplexity over non-overlapping windows; KLD and top-1 against ``reference``; optionally a task.

    model: a ``LoadedModel`` or a ``CausalLM`` (then pass ``tokenizer`` for text data or a task).
    data: a text file (default: the WikiText excerpt), token ids (1-D, cut into windows of ``ctx``) or
        ready windows (W, ctx). With saved reference logits and no data, their own windows are used.
    reference: None, a ``LoadedModel``/``CausalLM`` (run on the same windows), or ``ReferenceLogits``.
    windows: how many windows to evaluate (None/0: all the data holds).
    first: first scored logit row per window (default ``ctx // 2``, llama.cpp's second half).
    task: ``("lambada", FILE)`` adds last-word accuracy.
    """
    t0 = time.perf_counter()
    net, tok, label = _unwrap(model)
    tokenizer = tokenizer or tok
    name = name or label
    data_sha = None
    if isinstance(reference, ReferenceLogits) and data is None:
        win = reference.subset(windows).windows if windows else reference.windows
        data_label = f"{reference.meta.get('data', 'reference windows')}"
    elif isinstance(data, torch.Tensor) and data.dim() == 2:
        win, data_label = data[:windows] if windows else data, "token windows"
    elif data is not None and not isinstance(data, (str, Path)):
        win, data_label = token_windows(data, ctx, windows), "token ids"
    else:
        if tokenizer is None:
            raise ValueError("evaluating text needs a tokenizer: pass a LoadedModel or tokenizer=")
        win, data_sha = text_windows(tokenizer, data, ctx, windows)
        from miaotui.eval.data import default_data_path

        data_label = Path(data).name if data is not None else default_data_path().name
    ctx = win.shape[1]

    ref, ref_name = None, None
    if isinstance(reference, ReferenceLogits):
        first = reference.first if first is None else first
        reference.check(ctx=ctx, first=first, data_sha256=data_sha)
        ref, ref_name = reference.check_windows(win), reference.name
    elif reference is not None:
        ref_net, _, ref_name = _unwrap(reference)
        ref = ModelReference(ref_net, win, first)
    first = default_first(ctx) if first is None else first

    scores = score_windows(net, win, first, ref, batch_size, progress)
    stats = summarize(scores)
    dtype = str(next(net.parameters()).dtype).removeprefix("torch.")
    report = EvalReport(model=name, ctx=ctx, windows=win.shape[0], first=first, data=data_label, dtype=dtype,
                        reference=ref_name, **stats)
    if task is not None:
        if tokenizer is None:
            raise ValueError("a task needs a tokenizer: pass a LoadedModel or tokenizer=")
        result = run_task(task[0], task[1], net, tokenizer, task_limit, progress)
        report.tasks[result.name] = result
    report.seconds = time.perf_counter() - t0
    return report
