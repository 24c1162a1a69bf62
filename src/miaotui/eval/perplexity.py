"""Perplexity, KL divergence and top-1 agreement over non-overlapping windows.

The measures are llama.cpp's (``perplexity --kl-divergence``): every window of ``ctx`` tokens is run from an
empty context and only its second half is scored (logit rows ``ctx//2 .. ctx-2``, predicting tokens
``ctx//2+1 .. ctx-1``), so each scored token sees at least ``ctx/2`` tokens of context. Per scored token:

- NLL = -log q(next token); perplexity = exp(mean NLL)
- KLD = sum_v p(v) (log p(v) - log q(v)), p the reference, q the model; reported as mean and 99th percentile
- top-1 agreement: argmax q == argmax p

Log-softmax and the KLD sum run in fp64: KLD is a small difference of large terms (~1e-4 of ~10 nats).
Unlike llama.cpp, the KLD sum covers the whole vocabulary (llama.cpp skips p < e^-16); the difference is a
few 1e-7 nats.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from miaotui.models import CausalLM

ROW_CHUNK = 64  # fp64 rows compared at once: 64 x 49k vocab x 8 B = 25 MB per temporary


def default_first(ctx: int) -> int:
    """First scored logit row of a window (llama.cpp: the second half)."""
    return ctx // 2


@dataclass
class TokenScores:
    """Per scored token, in window order: (N,) tensors; the reference ones are None without a reference."""

    nll: torch.Tensor  # fp64
    kld: torch.Tensor | None = None  # fp64
    same_top1: torch.Tensor | None = None  # bool
    ref_nll: torch.Tensor | None = None  # fp64

    @staticmethod
    def cat(parts: list["TokenScores"]) -> "TokenScores":
        def join(name):
            vals = [getattr(p, name) for p in parts]
            return None if vals[0] is None else torch.cat(vals)

        return TokenScores(join("nll"), join("kld"), join("same_top1"), join("ref_nll"))


def compare_rows(logits: torch.Tensor, targets: torch.Tensor, ref_lp: torch.Tensor | None = None,
                 ref_top1: torch.Tensor | None = None) -> TokenScores:
    """Scores of R rows: logits (R, V) of the model, targets (R,), the reference's log-probs (R, V)
    and argmax (R,)."""
    lq = torch.log_softmax(logits.double(), dim=-1)
    nll = -lq.gather(1, targets[:, None]).squeeze(1)
    if ref_lp is None:
        return TokenScores(nll)
    ref_lp = ref_lp.double()
    p = ref_lp.exp()
    # 0 * -inf would be nan: a token the reference rules out contributes nothing
    terms = torch.where(p > 0, p * (ref_lp - lq), torch.zeros((), dtype=torch.float64))
    kld = terms.sum(-1)
    same = lq.argmax(-1) == ref_top1
    ref_nll = -ref_lp.gather(1, targets[:, None]).squeeze(1)
    return TokenScores(nll, kld, same, ref_nll)


@contextmanager
def no_kv_cache(model: CausalLM) -> Iterator[None]:
    """Full windows need no cache; set one aside (the engine's) so forward attends over the input alone."""
    layers = model.attention_layers()
    saved = [layer.kv_cache for layer in layers]
    for layer in layers:
        layer.kv_cache = None
    try:
        yield
    finally:
        for layer, cache in zip(layers, saved):
            layer.kv_cache = cache


def window_logits(model: CausalLM, windows: torch.Tensor, first: int) -> torch.Tensor:
    """Logits of the scored rows: windows (B, ctx) → (B, ctx-1-first, V), in the model's dtype."""
    rows = torch.arange(first, windows.shape[1] - 1)
    device = next(model.parameters()).device
    with torch.inference_mode(), no_kv_cache(model):
        return model(windows.to(device), 0, logit_rows=rows.to(device)).cpu()


def batch_size_for(ctx: int, batch_tokens: int = 1024) -> int:
    """Windows per forward: enough rows to fill the matmuls, few enough to keep the logits small."""
    return max(1, batch_tokens // ctx)


def score_windows(model: CausalLM, windows: torch.Tensor, first: int | None = None, reference=None,
                  batch_size: int | None = None, progress: bool = False) -> TokenScores:
    """Run every window (W, ctx) through ``model.forward`` and score its rows ``first .. ctx-2``.

    ``reference``: None, or an object with ``log_probs(w0, w1) -> (log-probs (R, V), argmax (R,))`` for
    windows [w0, w1) in row order (see ``reference.py``: a model computed on the fly, or a saved file).
    """
    from tqdm import tqdm

    n, ctx = windows.shape
    first = default_first(ctx) if first is None else first
    if not 0 <= first < ctx - 1:
        raise ValueError(f"the first scored position must be in [0, {ctx - 1}), got {first}")
    bs = batch_size or batch_size_for(ctx)
    parts = []
    with tqdm(total=n, desc="windows", unit="win", disable=not progress, leave=False) as bar:
        for w0 in range(0, n, bs):
            w1 = min(n, w0 + bs)
            logits = window_logits(model, windows[w0:w1], first)
            logits = logits.reshape(-1, logits.shape[-1])  # (B*S, V)
            targets = windows[w0:w1, first + 1:].reshape(-1)
            ref_lp, ref_top1 = reference.log_probs(w0, w1) if reference is not None else (None, None)
            if ref_lp is not None and ref_lp.shape[-1] != logits.shape[-1]:
                raise ValueError(f"the reference has a vocabulary of {ref_lp.shape[-1]} tokens, the model "
                                 f"{logits.shape[-1]}: they cannot be compared")
            for r in range(0, logits.shape[0], ROW_CHUNK):
                sl = slice(r, r + ROW_CHUNK)
                parts.append(compare_rows(logits[sl], targets[sl],
                                          None if ref_lp is None else ref_lp[sl],
                                          None if ref_top1 is None else ref_top1[sl]))
            bar.update(w1 - w0)
    return TokenScores.cat(parts)


def summarize(scores: TokenScores) -> dict[str, float]:
    """The headline numbers: perplexity (± its standard error) and, with a reference, KLD and top-1."""
    import math

    nll = scores.nll
    n = nll.numel()
    mean = nll.mean().item()
    ppl = math.exp(mean)
    # error propagated from the standard error of the mean NLL (what llama.cpp prints after ±)
    stderr = ppl * (nll.std().item() / math.sqrt(n - 1)) if n > 1 else 0.0
    out = {"tokens": n, "perplexity": ppl, "perplexity_stderr": stderr}
    if scores.kld is not None:
        kld = scores.kld
        out.update(
            reference_perplexity=math.exp(scores.ref_nll.mean().item()),
            kld_mean=kld.mean().item(),
            kld_median=torch.quantile(kld, 0.5).item(),
            kld_p99=torch.quantile(kld, 0.99).item(),  # linear interpolation, as llama.cpp's percentile
            kld_max=kld.max().item(),
            top1_agreement=scores.same_top1.double().mean().item(),
        )
    return out
