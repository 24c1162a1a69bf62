"""Knobs of the batching engine: the paged KV cache's shape and the scheduler's per-step limits."""

from __future__ import annotations

from dataclasses import dataclass, field

from miaotui.errors import MiaotuiError


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: ``num_blocks`` blocks of ``block_size`` token slots each.

    The runner sizes ``num_blocks`` from the memory it may spend; the bookkeeping only counts blocks.
    """

    block_size: int = 16
    num_blocks: int = 1024
    enable_prefix_caching: bool = True  # benchmarks turn it off so repeated prompts are not free

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise MiaotuiError("block_size must be >= 1")
        if self.num_blocks < 1:
            raise MiaotuiError("num_blocks must be >= 1")

    @property
    def num_slots(self) -> int:
        """Tokens the whole cache holds."""
        return self.block_size * self.num_blocks


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
