"""Speculative decoding: a cheap proposer guesses the next k tokens, one target forward checks them all.

Each step feeds the target ``[last token, d_1 … d_k]`` at ``start_pos = len(sequence) - 1`` and gets
k+1 next-token distributions in one pass. Accepted drafts plus one token from the target are emitted,
so every target forward yields 1 … k+1 tokens. Rejected drafts need no cleanup: their K/V sit past
the new end of the sequence and the next forward overwrites them.

The acceptance rule keeps the output distribution exactly the target's (Leviathan et al. 2023,
Chen et al. 2023): draft ``d ~ q`` is accepted with probability ``min(1, p(d) / q(d))``; on rejection
the token is drawn from ``norm(max(0, p - q))``; when all k are accepted a bonus token is drawn from
the target's last distribution. Greedy is the special case where p is one-hot: accept while the draft
equals the target's argmax, then emit the argmax. Deterministic proposers (prompt lookup, a greedy
draft) have a one-hot q, so they need no distribution of their own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from miaotui.config import GenerationStats, SamplingParams
from miaotui.engine.generate import ensure_cache, start_generation
from miaotui.engine.sampler import filtered_probs
from miaotui.models import CausalLM


@dataclass
class Proposal:
    """Up to k guessed tokens and, for a sampling proposer, the distributions they were drawn from."""

    tokens: list[int]
    probs: torch.Tensor | None = None  # (len(tokens), V): row i is what tokens[i] was drawn from; None = one-hot


class Proposer(Protocol):
    def reset(self, prompt_ids: list[int], max_len: int) -> None:
        """A new sequence starts; it will never grow past ``max_len`` tokens."""

    def propose(self, history: list[int], limit: int, params: SamplingParams,
                generator: torch.Generator) -> Proposal:
        """Guess at most ``limit`` tokens that follow ``history`` (prompt + accepted tokens)."""


class PromptLookupProposer:
    """Guess that the text repeats itself: find the latest earlier occurrence of the last n tokens
    (n = ``max_ngram`` down to ``min_ngram``) and propose what followed it. No model, no cost;
    wins on summarisation, code editing and retrieval answers, which copy spans of the prompt.

    Example: history ``[1, 2, 3, 4, 5, 9, 1, 2, 3]`` → the trigram ``1 2 3`` occurred at 0 → ``[4, 5, 9]``.
    A continuation that runs into the end of the history keeps copying with the same period
    (``[7, 8, 7, 8, 7]`` → ``[8, 7, 8, 7]``), as a repeating loop would.
    """

    def __init__(self, max_ngram: int = 3, num_speculative: int = 5, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        if num_speculative < 1:
            raise ValueError("num_speculative must be >= 1")
        self.max_ngram, self.min_ngram, self.num_speculative = max_ngram, min_ngram, num_speculative

    def reset(self, prompt_ids: list[int], max_len: int) -> None:
        pass

    def propose(self, history: list[int], limit: int, params: SamplingParams | None = None,
                generator: torch.Generator | None = None) -> Proposal:
        k = min(self.num_speculative, limit)
        if k <= 0 or len(history) < 2:
            return Proposal([])
        ids = torch.tensor(history)
        for n in range(min(self.max_ngram, len(history) - 1), self.min_ngram - 1, -1):
            # windows that end before the last token, so at least one token follows each
            windows = ids[:-1].unfold(0, n, 1)  # (L - n, n)
            hits = (windows == ids[-n:]).all(dim=1).nonzero()
            if hits.numel():
                src = int(hits[-1]) + n  # first token after the latest match
                ext = list(history)
                for j in range(k):  # overlapping copy: may read tokens it has just proposed
                    ext.append(ext[src + j])
                return Proposal(ext[len(history):])
        return Proposal([])


class DraftModelProposer:
    """A smaller model with the same tokenizer drafts k tokens one by one from its own cache.

    The draft remembers which tokens its cache holds; each call feeds only the part of the history
    it has not seen (after a rejection: the target's replacement token; after a full acceptance: the
    last draft plus the bonus token), so its cache follows the accepted sequence without a rollback.
    It samples with the same ``SamplingParams`` as the target, which keeps acceptance high.
    """

    def __init__(self, draft_model: CausalLM, k: int = 4):
        if k < 1:
            raise ValueError("k must be >= 1")
        self.model, self.k = draft_model, k
        self._forward = _fast_forward(draft_model)  # rebuilt at reset(), once the draft has its cache
        self._fed: list[int] = []  # token at each cache position, as written by this proposer
        self._accepted = 0  # length of the history at the last call

    def reset(self, prompt_ids: list[int], max_len: int) -> None:
        ensure_cache(self.model, min(max_len, self.model.max_seq_len))
        self._fed, self._accepted = [], 0
        self._forward = _fast_forward(self.model)  # the draft's tokens through the fused native step if it can

    def _last_logits(self, ids: list[int], start: int, device: torch.device) -> torch.Tensor:
        return self._forward(torch.tensor([ids], device=device), start, last_only=True)[-1]

    def propose(self, history: list[int], limit: int, params: SamplingParams,
                generator: torch.Generator) -> Proposal:
        n = len(history)
        # drafting k tokens writes positions up to n + k - 2
        k = min(self.k, limit, self.model.cache_len - n + 1)
        if k <= 0:
            return Proposal([])
        # feed at least the last token; the previous history was accepted, so it is still there
        start = _common_prefix(self._fed, history, n - 1, hint=self._accepted)
        self._accepted = n
        device = next(self.model.parameters()).device
        # history + drafts so far, for the repetition penalty
        seen = torch.tensor(history + [0] * k, device=device) if params.repetition_penalty != 1.0 else None
        logits = self._last_logits(history[start:], start, device)
        self._fed = list(history)
        tokens: list[int] = []
        rows: list[torch.Tensor] = []
        for i in range(k):
            if i:
                logits = self._last_logits([tokens[-1]], n + i - 1, device)
                self._fed.append(tokens[-1])
            probs = filtered_probs(logits, params, seen[:n + i] if seen is not None else None)
            tokens.append(int(probs.argmax()) if params.greedy else draw(probs, generator))
            rows.append(probs)
            if seen is not None:
                seen[n + i] = tokens[-1]
        return Proposal(tokens, None if params.greedy else torch.stack(rows))


def _common_prefix(a: list[int], b: list[int], cap: int, hint: int = 0) -> int:
    """Length of the common prefix of ``a`` and ``b``, at most ``cap``; ``hint``: a length that
    probably matches, so the element-by-element scan only covers the tail."""
    m = min(len(a), len(b), cap)
    if a[:m] == b[:m]:  # slice comparisons run at C speed
        return m
    lo = hint if hint < m and a[:hint] == b[:hint] else 0
    return next(i for i in range(lo, m) if a[i] != b[i])


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from a (V,) distribution that need not be normalised; zero entries are never drawn."""
    cdf = torch.cumsum(probs, dim=-1, dtype=torch.float64)
    cdf = cdf / cdf[-1:]
    u = torch.rand(1, dtype=torch.float64, generator=generator,
                   device=generator.device if generator is not None else "cpu")
    return int(torch.searchsorted(cdf, u.to(cdf.device), right=True))


def verify_proposal(p: torch.Tensor, drafts: list[int], q: torch.Tensor | None, greedy: bool,
                    generator: torch.Generator | None) -> list[int]:
    """Accepted drafts followed by one token from the target: 1 … k+1 tokens.

    ``p`` (k+1, V): the target's distribution after the last accepted token and after each draft;
    ``q`` (k, V') or None: what each draft was drawn from (None = deterministic, i.e. one-hot). A
    (k+1)-th row of ``q`` means a further draft was an id the target lacks (p = 0): it is rejected
    for sure, so the last token comes from ``norm(max(0, p_k - q_k))`` instead of ``p_k``.
    Example (greedy): target argmaxes [5, 7, 2], drafts [5, 9] → [5, 7].
    """
    k = len(drafts)
    vocab = p.shape[-1]
    if greedy:
        best = p.argmax(dim=-1).tolist()
        n_acc = next((i for i in range(k) if drafts[i] != best[i]), k)
        return drafts[:n_acc] + [best[n_acc]]
    rows, d = torch.arange(k, device=p.device), torch.tensor(drafts, dtype=torch.long, device=p.device)
    p_d = p[rows, d].double()
    if q is not None:
        q = _fit_vocab(q.to(p.device), vocab)
        q_d = q[rows, d].double()
    else:
        q_d = torch.ones_like(p_d)
    u = torch.rand(k, dtype=torch.float64, generator=generator,
                   device=generator.device if generator is not None else "cpu").to(p.device)
    rejected = (u * q_d >= p_d).tolist()  # accept with probability min(1, p/q)
    n_acc = next((i for i in range(k) if rejected[i]), k)
    if n_acc == k and (q is None or q.shape[0] == k):
        return drafts + [draw(p[k], generator)]
    if q is not None:
        residual = (p[n_acc] - q[n_acc]).clamp(min=0)
    else:
        residual = p[n_acc].clone()
        residual[drafts[n_acc]] = 0.0
    # p == q up to rounding leaves no residual mass: then p itself is the right law
    last = draw(residual if float(residual.sum()) > 0 else p[n_acc], generator)
    return drafts[:n_acc] + [last]


def _fit_vocab(q: torch.Tensor, vocab: int) -> torch.Tensor:
    """Pad or cut a draft's distributions to the target's vocabulary size (padding rows differ)."""
    if q.shape[-1] == vocab:
        return q
    if q.shape[-1] > vocab:
        return q[:, :vocab]
    return torch.nn.functional.pad(q, (0, vocab - q.shape[-1]))


def _target_probs(logits: torch.Tensor, params: SamplingParams, history: torch.Tensor, n: int,
                  k: int) -> torch.Tensor:
    """(k+1, V) logits → the distributions plain decoding would sample from at each position.

    ``history[:n]`` is the sequence so far and ``history[n:n+k]`` the drafts: row i comes after
    ``drafts[:i]``, which the repetition penalty must count as already generated.
    """
    if params.repetition_penalty == 1.0:
        return filtered_probs(logits, params)
    # one batched call: row i sees history[:n+i]; later drafts are masked by repeating a token the
    # row has seen anyway (the penalty ignores repeats)
    seen = history[:n + k].expand(k + 1, -1).clone()  # (k+1, n+k)
    later = torch.arange(n + k, device=seen.device) >= n + torch.arange(k + 1, device=seen.device)[:, None]
    seen[later] = history[n - 1]
    return filtered_probs(logits, params, seen)


NATIVE_MAX_TOKENS = 16  # longer inputs (a prompt) are a prefill: the model's batched matmuls win


def _fast_forward(model: CausalLM) -> Callable[..., torch.Tensor]:
    """``forward(ids (1, T), start, last_only=False) → logits (T or 1, V)``: the fused native step for a
    few tokens where it covers the model (one C++ call instead of a Python forward: kernels/decode_plan.py),
    else the model's own forward. Call it once the model's cache is set up."""
    from miaotui.kernels.decode_plan import NativeDecode

    native, _ = NativeDecode.build(model)

    def forward(ids: torch.Tensor, start: int, last_only: bool = False) -> torch.Tensor:
        if native is not None and ids.shape[1] <= NATIVE_MAX_TOKENS:
            logits = native(ids, start)
            return logits[-1:] if last_only else logits
        return model(ids, start, last_only=last_only)[0]

    return forward


@torch.inference_mode()
def speculative_generate_tokens(
    target: CausalLM,
    prompt_ids: list[int],
    params: SamplingParams,
    proposer: Proposer,
    eos_ids: Iterable[int] = (),
    generator: torch.Generator | None = None,
    stats: GenerationStats | None = None,
) -> Iterator[int]:
    """``generate_tokens`` with speculation: same contract, same output law, fewer target forwards.

    Yields new ids until EOS (not yielded), ``max_tokens`` or the context is full, never more than
    those allow even when a verified block would run past them. Greedy output equals
    ``generate_tokens``'s token for token (up to float rounding between the batched and the one-token
    forward). ``stats.extra["spec"]`` counts proposed and accepted drafts and target forwards.
    """
    stats = stats if stats is not None else GenerationStats()
    n = len(prompt_ids)
    # history: seq as a tensor, with room for the drafts being verified; the repetition penalty reads it
    max_new, generator, eos, history = start_generation(target, prompt_ids, params, eos_ids, generator)
    seq = list(prompt_ids)
    proposer.reset(seq, n + max_new)
    spec = {"proposed": 0, "accepted": 0, "acceptance_rate": 0.0, "target_forwards": 0}
    stats.extra["spec"] = spec
    stats.prompt_tokens, stats.completion_tokens, stats.finish_reason = n, 0, "length"

    verify = _fast_forward(target)
    t0 = time.perf_counter()
    t_first = None
    vocab = None  # known from the first logits; drafts must be ids the target has
    if n > 1:  # the last prompt token goes in with the first drafts
        vocab = target(history[:n - 1].unsqueeze(0), 0, last_only=True).shape[-1]
    while True:
        remaining = max_new - stats.completion_tokens
        # a block emits up to k+1 tokens: k = remaining - 1 fills the budget exactly, and the last
        # token is never fed, so positions stay below n + max_new <= context
        limit = remaining - 1 if vocab is not None else 0  # a one-token prompt: no vocabulary known yet
        proposal = proposer.propose(seq, limit, params, generator) if limit > 0 else Proposal([])
        tokens = proposal.tokens[:limit]
        # a draft with a larger (padded) vocabulary may propose an id the target lacks: it cannot be
        # fed, and it is rejected for sure, which verify_proposal reads from q's extra row
        k = next((i for i, t in enumerate(tokens) if t >= vocab), len(tokens))
        drafts, pos = tokens[:k], len(seq)
        q = proposal.probs[:k + 1] if proposal.probs is not None and not params.greedy else None
        history[pos:pos + k] = torch.tensor(drafts, dtype=torch.long)
        logits = verify(history[pos - 1:pos + k].unsqueeze(0), pos - 1)  # (k+1, V)
        vocab = logits.shape[-1]
        p = _target_probs(logits, params, history, pos, k)
        out = verify_proposal(p, drafts, q, params.greedy, generator)
        spec["proposed"] += k
        spec["accepted"] += len(out) - 1
        spec["target_forwards"] += 1
        spec["acceptance_rate"] = spec["accepted"] / spec["proposed"] if spec["proposed"] else 0.0
        for token in out:
            now = time.perf_counter()
            if t_first is None:
                stats.ttft_s, t_first = now - t0, now
            if token in eos:
                stats.finish_reason = "stop"
                return
            stats.decode_s = now - t_first  # up to the last token actually delivered
            stats.completion_tokens += 1
            history[len(seq)] = token
            seq.append(token)
            yield token
            if stats.completion_tokens == max_new:
                return
