"""Next-token sampling as pure functions of logits, ``SamplingParams`` and an explicit generator.

Every filter takes logits of shape (V,) or (B, V), returns a new tensor with removed entries set
to ``-inf`` and never mutates its input. Ties at a filter's boundary are kept: a token whose
probability equals the last kept one's is kept too, so the kept set never depends on sort order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from miaotui.config import SamplingParams

# Relative slack so a cumulative mass or ratio that equals the threshold up to float rounding
# counts as reaching it (probs [.5, .2, ...] with top_p=.7 keeps exactly two tokens).
_REL_TOL = 1e-5


def _probs(logits: torch.Tensor) -> torch.Tensor:
    # at least float32: a bf16 cumsum over a 150k vocabulary is useless
    return torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def apply_repetition_penalty(
    logits: torch.Tensor, token_ids: torch.Tensor | Sequence[int], penalty: float
) -> torch.Tensor:
    """CTRL / HF penalty: for every token id seen before, positive logits are divided by
    ``penalty`` and negative ones multiplied, so ``penalty > 1`` always makes it less likely.

    ``token_ids`` is (T,) (applied to every row) or (B, T) for (B, V) logits; repeats are fine.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long, device=logits.device)
    if penalty == 1.0 or ids.numel() == 0:
        return logits.clone()
    if ids.dim() == 1 and logits.dim() == 2:
        ids = ids.expand(logits.shape[0], -1)
    seen = logits.gather(-1, ids)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(-1, ids, seen)  # duplicate ids write the same value, so order is moot


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` highest logits (plus any tied with the k-th); ``k <= 0`` disables."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits.clone()
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most probable tokens whose total probability
    is >= ``p`` (the top token always survives); ``p >= 1`` disables.

    Example: probs [.5, .2, .15, .1, .05] → p=.7 keeps {0, 1}; p=.71 keeps {0, 1, 2}.
    """
    if p >= 1.0:
        return logits.clone()
    probs = _probs(logits)
    vocab, k = probs.shape[-1], 256
    # the nucleus is usually small: a top-k is ~40x cheaper than sorting a 150k vocabulary
    while True:
        top = torch.topk(probs, k, dim=-1).values if k < vocab else probs.sort(dim=-1, descending=True).values
        mass_before = torch.cumsum(top, dim=-1) - top  # mass of strictly better tokens
        n_keep = (mass_before < p * (1 - _REL_TOL)).sum(dim=-1, keepdim=True).clamp(min=1)  # (..., 1)
        if k >= vocab or bool((n_keep < k).all()):  # else the nucleus may reach past the top k
            break
        k = min(vocab, k * 8)
    threshold = top.gather(-1, n_keep - 1)  # prob of the last kept token
    return logits.masked_fill(probs < threshold, float("-inf"))


def min_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep tokens with ``prob >= p * max_prob``; ``p <= 0`` disables."""
    if p <= 0.0:
        return logits.clone()
    probs = _probs(logits)
    threshold = p * (1 - _REL_TOL) * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def _penalised(logits: torch.Tensor, params: SamplingParams, history) -> torch.Tensor:
    x = logits.float()
    if history is not None and params.repetition_penalty != 1.0:
        x = apply_repetition_penalty(x, history, params.repetition_penalty)
    return x


def _filtered_softmax(x: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    x = x / params.temperature
    x = top_k_filter(x, params.top_k)
    x = top_p_filter(x, params.top_p)
    x = min_p_filter(x, params.min_p)
    return torch.softmax(x, dim=-1)


def filtered_probs(
    logits: torch.Tensor,
    params: SamplingParams,
    history: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """The exact distribution ``sample`` draws from, (V,) → (V,) or (B, V) → (B, V), float32.

    Same pipeline as ``sample`` (repetition penalty on ``history`` → temperature → top-k → top-p →
    min-p); temperature 0 gives a one-hot at the argmax. Speculative decoding needs the
    distribution itself, not a draw, to accept or reject a proposed token.
    """
    x = _penalised(logits, params, history)
    if params.temperature == 0:
        return torch.zeros_like(x).scatter_(-1, x.argmax(dim=-1, keepdim=True), 1.0)
    return _filtered_softmax(x, params)


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    history: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick next tokens from logits (V,) → scalar tensor, or (B, V) → (B,).

    Order: repetition penalty on ``history`` → argmax if temperature is 0 → temperature →
    top-k → top-p → min-p → one draw per row with ``generator``. Works in float32.
    The distribution drawn from is ``filtered_probs(logits, params, history)``.
    """
    x = _penalised(logits, params, history)
    if params.temperature == 0:
        return x.argmax(dim=-1)
    # inverse CDF, one uniform per row: same law as torch.multinomial, which draws one random
    # number per vocabulary entry (~4 ms for 150k on CPU); normalising makes the last entry
    # exactly 1.0 > u, and zero-probability tokens (equal CDF steps) can never be picked
    cdf = torch.cumsum(_filtered_softmax(x, params), dim=-1, dtype=torch.float64)
    cdf = cdf / cdf[..., -1:]
    u = torch.rand((*cdf.shape[:-1], 1), dtype=torch.float64, generator=generator, device=cdf.device)
    return torch.searchsorted(cdf, u, right=True).reshape(logits.shape[:-1])


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded with ``seed``, or from OS entropy when None so that runs differ."""
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little"))
    return g
