"""OpenAI's sampling knobs the core sampler does not have: ``logit_bias``, presence/frequency penalties and
per-token logprobs, added around ``LLMEngine._sample`` for the requests that ask for them.

They live here, not in ``SamplingParams``, because they are HTTP-API semantics (vLLM/OpenAI): penalties count
the *generated* tokens only (the repetition penalty, a CTRL one, also counts the prompt), and logprobs are the
model's own distribution (raw logits, before bias, penalties, temperature and filters), as vLLM reports them.
Requests without them take the engine's path untouched, so greedy output is the engine's exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from miaotui.engine.llm_engine import LLMEngine

# (chosen id, its logprob, [(alternative id, logprob), ...] best first)
TokenLogprob = tuple[int, float, list[tuple[int, float]]]


@dataclass(frozen=True)
class OpenAIExtras:
    logit_bias: dict[int, float] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # alternatives per token to return; 0 = the chosen token's only; None = off

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.logit_bias) or self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def needed(self) -> bool:
        return self.adjusts_logits or self.logprobs is not None


class ServerEngine(LLMEngine):
    """``LLMEngine`` plus ``OpenAIExtras`` per request; ``pop_logprobs(id)`` after each ``step``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._extras: dict[str, OpenAIExtras] = {}
        self._logprobs: dict[str, list[TokenLogprob]] = {}

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    def add_request(self, request_id, prompt_token_ids, params=None, extras: OpenAIExtras | None = None) -> None:
        super().add_request(request_id, prompt_token_ids, params)
        if extras is not None and extras.needed:
            self._extras[request_id] = extras

    def abort(self, request_id: str) -> bool:
        self._extras.pop(request_id, None)
        self._logprobs.pop(request_id, None)
        return super().abort(request_id)

    def pop_logprobs(self, request_id: str) -> list[TokenLogprob]:
        return self._logprobs.pop(request_id, [])

    def step(self):
        outputs = super().step()
        for o in outputs:
            if o.finished:
                self._extras.pop(o.request_id, None)
        return outputs

    def _sample(self, batch, logits: torch.Tensor) -> dict[str, list[int]]:
        rows = [(i, self._extras[rid]) for i, rid in enumerate(batch.sample_ids) if rid in self._extras]
        if not rows:
            return super()._sample(batch, logits)
        adjusted = logits
        if any(x.adjusts_logits for _, x in rows):
            adjusted = logits.float().clone()  # (R, V); the other rows are unchanged copies
            for i, x in rows:
                if x.adjusts_logits:
                    adjusted[i] = self._adjust(adjusted[i], batch.sample_ids[i], x)
        sampled = super()._sample(batch, adjusted)
        for i, x in rows:
            if x.logprobs is not None:
                rid = batch.sample_ids[i]
                self._logprobs.setdefault(rid, []).append(_logprob(logits[i], sampled[rid][0], x.logprobs))
        return sampled

    def _adjust(self, row: torch.Tensor, request_id: str, x: OpenAIExtras) -> torch.Tensor:
        if x.logit_bias:
            ids = torch.tensor(list(x.logit_bias), dtype=torch.long)
            row[ids] += torch.tensor(list(x.logit_bias.values()), dtype=row.dtype)
        out_ids = self.scheduler.get_request(request_id).output_token_ids
        if out_ids and (x.presence_penalty or x.frequency_penalty):
            counts = torch.bincount(torch.tensor(out_ids, dtype=torch.long), minlength=row.shape[-1])
            counts = counts[:row.shape[-1]].to(row.dtype)
            row -= x.frequency_penalty * counts + x.presence_penalty * (counts > 0).to(row.dtype)
        return row


def _logprob(row: torch.Tensor, token: int, top: int) -> TokenLogprob:
    lp = torch.log_softmax(row.float(), dim=-1)  # (V,)
    alts: list[tuple[int, float]] = []
    if top > 0:
        values, ids = torch.topk(lp, min(top, lp.shape[-1]))
        alts = list(zip(ids.tolist(), values.tolist()))
    return token, float(lp[token]), alts
