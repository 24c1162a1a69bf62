"""The library API: ``LLM(model).generate(prompt, params)`` and ``.stream(...)``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from miaotui.config import GenerationStats, SamplingParams
from miaotui.engine.text import stream_text
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

    def __init__(self, model: str | LoadedModel | None = None, dtype: str = "fp32", progress: bool = False):
        self.loaded = model if isinstance(model, LoadedModel) else load(model, dtype, progress)

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
        return stream_text(self.loaded.model, self.tokenizer, ids, params, self.loaded.eos_token_ids, stats)

    def generate(self, prompts: Prompt | list[Prompt], params: SamplingParams | None = None):
        """One prompt → a Completion; a list of prompts → a list of Completions."""
        if isinstance(prompts, list) and prompts and not isinstance(prompts[0], dict):
            return [self.generate(p, params) for p in prompts]
        stats = GenerationStats()
        text = "".join(self.stream(prompts, params, stats))
        return Completion(text, stats)
