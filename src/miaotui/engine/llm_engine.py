"""Continuous batching: many requests share one forward pass per step over a paged KV cache.

    engine = LLMEngine(load(path), config=EngineConfig(max_num_seqs=16))
    engine.add_request("a", [1, 2, 3], SamplingParams(temperature=0, max_tokens=8))
    while engine.has_unfinished():
        for out in engine.step():          # RequestOutput(request_id, new_token_ids, finished, ...)
            ...

One step = ``scheduler.schedule()`` → one forward of every scheduled token (decodes and prompt chunks,
flattened into one batch, see ``paged_cache.py``) → one token sampled for each request that reached the end
of its known tokens, with that request's own ``SamplingParams`` and seeded generator → ``scheduler.update()``.
Requests join (``add_request``) and leave (finish, ``abort``) between any two steps.

Token ids only: text (tokenizing, detokenizing, stop strings) lives at the edges (``llm.py``, the server).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from miaotui.config import SamplingParams
from miaotui.engine.engine_config import OFFLINE_MAX_BATCHED_TOKENS, CacheConfig, EngineConfig
from miaotui.engine.paged_cache import PagedKVPool, StepBatch, kv_block_bytes
from miaotui.engine.request import Request, RequestOutput
from miaotui.engine.sampler import make_generator, sample
from miaotui.engine.scheduler import Scheduler, SchedulerOutput
from miaotui.errors import MiaotuiError
from miaotui.models import CausalLM

if TYPE_CHECKING:
    from miaotui.loading import LoadedModel


def budget_blocks(model: CausalLM, cache: CacheConfig) -> int:
    """Blocks that fit ``cache.memory_budget_gib`` of K/V for this model (in its dtype)."""
    return int(cache.memory_budget_gib * 2**30) // kv_block_bytes(model, cache.block_size)


def resolve_config(config: EngineConfig, model: CausalLM) -> EngineConfig:
    """Clamp the context to the model's and size the cache when ``num_blocks`` is None: room for
    ``max_num_seqs`` full-length requests, capped at the memory budget."""
    max_len = min(config.max_model_len, model.max_seq_len)
    cache = config.cache
    if cache.num_blocks is None:
        per_seq = -(-max_len // cache.block_size)
        blocks = min(config.max_num_seqs * per_seq, budget_blocks(model, cache))
        cache = dataclasses.replace(cache, num_blocks=max(1, blocks))
    return dataclasses.replace(config, max_model_len=max_len, cache=cache)


def offline_config(model: CausalLM, needs: list[int], enable_prefix_caching: bool = True) -> EngineConfig:
    """An offline batch (``LLM.generate`` on a list, ``miaotui bench``'s throughput) of requests needing
    ``needs`` tokens each (prompt + output): just enough context and KV blocks for all of them to run at
    once (within the memory budget), and the offline step budget."""
    cache = CacheConfig(enable_prefix_caching=enable_prefix_caching)
    needs = [min(n, model.max_seq_len) for n in needs]
    blocks = min(sum(-(-n // cache.block_size) for n in needs), budget_blocks(model, cache))
    seqs = min(len(needs), 64)
    return EngineConfig(max_model_len=max(2, max(needs)), max_num_seqs=seqs,
                        max_num_batched_tokens=max(OFFLINE_MAX_BATCHED_TOKENS, seqs),  # every decode fits a step
                        cache=dataclasses.replace(cache, num_blocks=max(1, blocks)))


@dataclass
class _Sequence:
    """What the engine keeps per live request: how to sample it."""

    params: SamplingParams
    generator: torch.Generator
    history: torch.Tensor | None  # prompt + output ids for the repetition penalty (None when it is off)
    length: int  # valid entries of history


@dataclass
class EngineStats:
    """Counters over the engine's lifetime."""

    num_steps: int = 0
    num_computed_tokens: int = 0  # tokens that went through the model (prefix-cache hits skip it)
    num_sampled_tokens: int = 0
    num_preemptions: int = 0


class LLMEngine:
    def __init__(self, model: CausalLM | LoadedModel, eos_token_ids: Iterable[int] | None = None,
                 config: EngineConfig | None = None):
        """``model``: a ``LoadedModel`` (its EOS ids are the default) or a bare ``CausalLM``."""
        if not isinstance(model, CausalLM):  # a LoadedModel
            if eos_token_ids is None:
                eos_token_ids = model.eos_token_ids
            model = model.model
        self.model = model
        self.device = next(model.parameters()).device
        self.eos_token_ids = frozenset(eos_token_ids or ())
        self.config = resolve_config(config or EngineConfig(), model)
        self.scheduler = Scheduler(self.config)
        self.kv = PagedKVPool(model, self.config.cache.num_blocks, self.config.cache.block_size)
        self.stats = EngineStats()
        self._seqs: dict[str, _Sequence] = {}
        self._gen_calls = 0

    # ---- requests in and out
    def add_request(self, request_id: str, prompt_token_ids: Sequence[int],
                    params: SamplingParams | None = None) -> None:
        """Queue a request; it joins the batch at the next step the scheduler admits it.

        Raises ``PromptTooLongError`` / ``MiaotuiError`` for a request that could never run."""
        params = params or SamplingParams()
        req = Request(request_id, prompt_token_ids, params, eos_token_ids=self.eos_token_ids)
        self.scheduler.add_request(req)
        history, n = None, req.num_prompt_tokens
        if params.repetition_penalty != 1.0:
            history = torch.empty(self.config.max_model_len, dtype=torch.long, device=self.device)
            history[:n] = torch.tensor(req.prompt_token_ids, dtype=torch.long)
        self._seqs[request_id] = _Sequence(params, make_generator(params.seed, self.device), history, n)

    def abort(self, request_id: str) -> bool:
        """Cancel a request and free its blocks; False when it is unknown or already finished."""
        self._seqs.pop(request_id, None)
        return self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def get_request(self, request_id: str) -> Request | None:
        """The live request (its token ids, ``num_computed_tokens``, ``num_cached_tokens``...), if any."""
        return self.scheduler.get_request(request_id)

    # ---- one step
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Schedule, run one batched forward, sample; an output for every request that sampled."""
        out = self.scheduler.schedule()
        for rid in out.finished_request_ids:
            self._seqs.pop(rid, None)
        self.stats.num_preemptions += len(out.preempted_request_ids)
        if out.is_empty:
            return []
        batch = StepBatch.build(out, self.device)
        logits = self._forward(batch)
        sampled = self._sample(batch, logits)
        outputs = self.scheduler.update(out, sampled)
        for o in outputs:
            seq = self._seqs[o.request_id]
            if o.finished:
                del self._seqs[o.request_id]
            elif seq.history is not None:
                seq.history[seq.length:seq.length + len(o.new_token_ids)] = torch.tensor(o.new_token_ids)
                seq.length += len(o.new_token_ids)
        self.stats.num_steps += 1
        self.stats.num_computed_tokens += batch.num_tokens
        self.stats.num_sampled_tokens += len(sampled)
        return outputs

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> tuple[list[str], torch.Tensor]:
        """The forward alone (no sampling, no bookkeeping): request ids and their logits (R, V).
        For tests and tools; ``step`` is the way to run requests."""
        batch = StepBatch.build(out, self.device)
        return batch.sample_ids, self._forward(batch)

    def _forward(self, batch: StepBatch) -> torch.Tensor:
        with self.kv.bound(self.model, batch):
            return self.model(batch.input_ids, batch.positions, logit_rows=batch.logit_rows)[0]  # (R, V)

    def _sample(self, batch: StepBatch, logits: torch.Tensor) -> dict[str, list[int]]:
        seqs = [self._seqs[rid] for rid in batch.sample_ids]
        # plain greedy rows need no per-request work: one argmax over all of them
        plain = [i for i, s in enumerate(seqs) if s.params.temperature == 0 and s.history is None]
        tokens: list[int] = [0] * len(seqs)
        if plain:
            rows = logits if len(plain) == len(seqs) else logits[plain]
            for i, t in zip(plain, rows.argmax(dim=-1).tolist()):
                tokens[i] = t
        for i, s in enumerate(seqs):
            if s.params.temperature == 0 and s.history is None:
                continue
            history = s.history[:s.length] if s.history is not None else None
            tokens[i] = int(sample(logits[i], s.params, s.generator, history))
        return {rid: [t] for rid, t in zip(batch.sample_ids, tokens)}

    # ---- convenience
    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[list[int]]:
        """Run prompts (token id lists) to completion as one continuous batch → new token ids per prompt.

        EOS is not included. Needs an idle engine (it would swallow other requests' outputs)."""
        if self.has_unfinished():
            raise MiaotuiError("generate() needs an idle engine; drive step() yourself to mix in other requests")
        plist = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise MiaotuiError(f"{len(prompts)} prompts but {len(plist)} sampling parameter sets")
        self._gen_calls += 1
        ids = [f"generate-{self._gen_calls}-{i}" for i in range(len(prompts))]
        results: dict[str, list[int]] = {rid: [] for rid in ids}
        try:
            for rid, prompt, p in zip(ids, prompts, plist):
                self.add_request(rid, prompt, p)
            while self.has_unfinished():
                for o in self.step():
                    results[o.request_id].extend(o.new_token_ids)
        finally:  # an error (or Ctrl-C) leaves the engine idle again
            for rid in ids:
                self.abort(rid)
        return [results[rid] for rid in ids]
