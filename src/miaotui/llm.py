"""The library API: ``LLM(model).generate(prompt, params)`` and ``.stream(...)``."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from miaotui.config import GenerationStats, SamplingParams
from miaotui.engine.engine_config import EngineConfig
from miaotui.engine.llm_engine import LLMEngine, offline_config
from miaotui.engine.prepare import prepare_for_inference
from miaotui.engine.runner import Runner
from miaotui.engine.text import TextAssembler, stream_text
from miaotui.errors import MiaotuiError
from miaotui.loading import LoadedModel, load
from miaotui.loading.tokenizer import encode, encode_chat

Prompt = str | list[dict[str, Any]]  # plain text, or chat messages [{"role": ..., "content": ...}]


@dataclass
class Completion:
    text: str
    stats: GenerationStats = field(default_factory=GenerationStats)

    def to_dict(self) -> dict[str, Any]:
        s = self.stats
        return {
            "text": self.text, "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
            "finish_reason": s.finish_reason, "ttft_s": round(s.ttft_s, 6),
            "prefill_tok_s": round(s.prefill_tok_s, 2), "decode_tok_s": round(s.decode_tok_s, 2),
        }


class LLM:
    """A loaded decoder with its tokenizer.

    >>> llm = LLM()                                   # the embedded default model
    >>> llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8)).text
    """

    def __init__(self, model: str | LoadedModel | None = None, dtype: str = "fp32", progress: bool = False,
                 compile: bool = False, kv_cache_dtype: str = "auto", device: str = "auto",
                 speculative: str | LoadedModel | None = None, num_speculative: int = 5):
        """``speculative``: decode single streams speculatively (``stream``/``generate`` of one prompt):
        "ngram" (prompt lookup: drafts copied from earlier text, no model) or a draft model (a path or a
        ``LoadedModel`` sharing the tokenizer); ``num_speculative`` drafts per step. Same output law; the
        greedy output is the same token for token.
        ``device``: "auto" (the GPU when PyTorch sees one, else the CPU), "cpu", "cuda" or "cuda:N".
        ``compile``: compile the decode step with torch.compile (faster per token; the first run pays a
        one-off compilation of a minute or more on 2 cores, later runs reuse inductor's on-disk cache).
        ``kv_cache_dtype``: "auto" (the model's dtype) or "int8" (a quarter of fp32's cache memory)."""
        from miaotui.compress.quant.kv import parse_kv_dtype
        from miaotui.device import resolve_device

        target = resolve_device(device)
        self.loaded = model if isinstance(model, LoadedModel) else load(model, dtype, progress)
        if self.loaded.model.device != target:
            self.loaded.model.to(target)
        try:
            self.loaded.model.kv_cache_dtype = parse_kv_dtype(kv_cache_dtype)
        except ValueError as e:
            raise MiaotuiError(str(e)) from None
        prepare_for_inference(self.loaded.model)  # fused projections, bf16 fallbacks: same results
        self.runner = Runner(self.loaded.model, compile=compile)
        self.proposer = self._proposer(speculative, num_speculative, dtype, target) if speculative else None

    def _proposer(self, spec: str | LoadedModel, k: int, dtype: str, device):
        from miaotui.engine.speculative import DraftModelProposer, PromptLookupProposer

        if k < 1:
            raise MiaotuiError(f"num_speculative must be >= 1, got {k}")
        if spec == "ngram":
            return PromptLookupProposer(num_speculative=k)
        draft = spec if isinstance(spec, LoadedModel) else load(spec, dtype)
        if draft.tokenizer.get_vocab() != self.tokenizer.get_vocab():
            raise MiaotuiError(f"draft model {draft.path} has a different tokenizer from the target "
                               f"{self.loaded.path}: speculative decoding needs the same token ids")
        if draft.model.device != device:
            draft.model.to(device)
        prepare_for_inference(draft.model)
        return DraftModelProposer(draft.model, k=k)

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def encode(self, prompt: Prompt) -> list[int]:
        return encode(self.tokenizer, prompt) if isinstance(prompt, str) else encode_chat(self.tokenizer, prompt)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None,
               stats: GenerationStats | None = None) -> Iterator[str]:
        """Yield text deltas; ``stats`` (if given) holds token counts and timings afterwards."""
        params = params or SamplingParams()
        ids = self.encode(prompt)
        return stream_text(self.runner, self.tokenizer, ids, params, self.loaded.eos_token_ids, stats,
                           proposer=self.proposer)

    def generate(self, prompts: Prompt | list[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 engine_config: EngineConfig | None = None):
        """One prompt → a Completion; a list of prompts → a list of Completions, run as one continuous batch
        (``params``: one set for all, or one per prompt). Outputs equal one-at-a-time ``generate`` calls."""
        if isinstance(prompts, list) and (not prompts or not isinstance(prompts[0], dict)):
            return self._generate_batch(prompts, params, engine_config)
        if not isinstance(params, (SamplingParams, type(None))):
            raise MiaotuiError("one prompt takes one SamplingParams")
        stats = GenerationStats()
        text = "".join(self.stream(prompts, params, stats))
        return Completion(text, stats)

    def _generate_batch(self, prompts: list[Prompt], params, engine_config: EngineConfig | None) -> list[Completion]:
        plist = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        plist = [p or SamplingParams() for p in plist]
        if len(plist) != len(prompts):
            raise MiaotuiError(f"{len(prompts)} prompts but {len(plist)} sampling parameter sets")
        if not prompts:
            return []
        ids = [self.encode(p) for p in prompts]
        # by default just enough context and KV blocks for these requests to all run at once
        config = engine_config or offline_config(self.loaded.model, [len(i) + p.max_tokens for i, p in zip(ids, plist)])
        engine = LLMEngine(self.loaded, config=config)
        pending = {str(i): _TextState(ids[i], plist[i], self.tokenizer) for i in range(len(prompts))}
        done: dict[str, _TextState] = {}
        t0 = time.perf_counter()
        try:
            for rid, st in pending.items():
                engine.add_request(rid, st.prompt_ids, st.params)
            while engine.has_unfinished():
                outputs = engine.step()
                now = time.perf_counter()
                for o in outputs:
                    st = pending[o.request_id]
                    stopped = st.add(o.new_token_ids, now - t0)
                    if stopped or o.finished:
                        if stopped:  # a stop string ends the request early: free its slot in the batch
                            engine.abort(o.request_id)
                        st.finish("stop" if stopped else o.finish_reason)
                        done[o.request_id] = pending.pop(o.request_id)
        finally:
            for rid in pending:
                engine.abort(rid)
        return [Completion("".join(done[str(i)].pieces), done[str(i)].stats) for i in range(len(prompts))]


class _TextState:
    """One batched request at the text edge: the same ``TextAssembler`` as ``stream_text``, so a batch
    gives what one-at-a-time generation gives, plus its stats."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, tokenizer):
        self.prompt_ids, self.params = prompt_ids, params
        self.text = TextAssembler(tokenizer, prompt_ids, params.stop)
        self.pieces: list[str] = []
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids), finish_reason="length")
        self._first = 0.0

    def add(self, tokens: list[int], elapsed: float) -> bool:
        """Feed new tokens; True when a stop string ended the text."""
        for token in tokens:
            if self.stats.completion_tokens == 0:
                self.stats.ttft_s = self._first = elapsed
            self.stats.completion_tokens += 1
            self.stats.decode_s = elapsed - self._first
            text, stopped = self.text.add(token)
            self.pieces.append(text)
            if stopped:
                return True
        return False

    def finish(self, reason: str | None) -> None:
        self.stats.finish_reason = reason
        text, stopped = self.text.finish()
        if stopped:
            self.stats.finish_reason = "stop"
        self.pieces.append(text)
