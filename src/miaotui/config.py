"""Typed configuration shared by the engine, the CLI and the library API."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. ``temperature == 0`` means greedy (argmax).

    Filters apply in this order: repetition penalty → temperature → top-k → top-p → min-p.
    ``top_k <= 0``, ``top_p >= 1`` and ``min_p <= 0`` disable the respective filter.
    """

    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 0.95
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        from miaotui.errors import MiaotuiError

        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
            (self.top_k >= 0, "top_k must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise MiaotuiError(msg)
        if isinstance(self.stop, str):  # a single stop string is a common slip
            object.__setattr__(self, "stop", (self.stop,))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class GenerationStats:
    """Timings of one generation, filled in by the engine as it runs."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float = 0.0  # prompt in → first new token out (prefill + first sample)
    decode_s: float = 0.0  # time spent after the first token
    finish_reason: str | None = None  # "stop" (EOS or stop string) | "length"
    extra: dict = field(default_factory=dict)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.ttft_s if self.ttft_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        # tokens after the first, over the time after the first
        n = self.completion_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0
