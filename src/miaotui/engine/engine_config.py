"""Knobs of the batching engine: the paged KV cache's shape and the scheduler's per-step limits."""

from __future__ import annotations

from dataclasses import dataclass, field

from miaotui.errors import MiaotuiError


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: ``num_blocks`` blocks of ``block_size`` token slots each.

    ``num_blocks=None`` lets ``LLMEngine`` size it: room for ``max_num_seqs`` requests of ``max_model_len``
    tokens, capped at ``memory_budget_gib`` of K/V (the bookkeeping itself needs a number: the engine hands the
    scheduler a resolved config).
    """

    block_size: int = 16
    num_blocks: int | None = None
    enable_prefix_caching: bool = True  # benchmarks turn it off so repeated prompts are not free
    memory_budget_gib: float = 2.0  # the most K/V storage an engine-sized cache may take

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise MiaotuiError("block_size must be >= 1")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise MiaotuiError("num_blocks must be >= 1")
        if self.memory_budget_gib <= 0:
            raise MiaotuiError("memory_budget_gib must be > 0")

    @property
    def num_slots(self) -> int:
        """Tokens the whole cache holds."""
        if self.num_blocks is None:
            raise MiaotuiError("num_blocks is not resolved yet (LLMEngine sizes it from the memory budget)")
        return self.block_size * self.num_blocks


# The token budget for offline batches (``LLM.generate`` on a list, ``miaotui bench``'s throughput): no one
# waits on a next token there, and a bigger prefill chunk runs the GEMMs nearer their peak (32 concurrent
# requests, SmolLM2 fp32, 2 threads, interleaved in one process: 1024 +5 %, 2048 +6 % against 512). Online
# serving keeps 512, where one step's prefill chunk is a stall every running request waits through.
OFFLINE_MAX_BATCHED_TOKENS = 2048


@dataclass(frozen=True)
class EngineConfig:
    """Limits of one scheduler step plus the cache it schedules into."""

    max_model_len: int = 2048  # context length: prompt + output never exceeds it
    max_num_seqs: int = 32  # requests in one batch
    max_num_batched_tokens: int = 512  # tokens (prefill chunks + decodes) in one forward
    cache: CacheConfig = field(default_factory=CacheConfig)

    def __post_init__(self) -> None:
        if self.max_model_len < 2:
            raise MiaotuiError("max_model_len must be >= 2 (one prompt token and one new token)")
        if self.max_num_seqs < 1:
            raise MiaotuiError("max_num_seqs must be >= 1")
        # every running decode must fit one step's budget, or some request could starve
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise MiaotuiError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_num_seqs ({self.max_num_seqs})"
            )
