"""One generation request as the scheduler sees it: token ids in, token ids out, and where its KV lives."""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from miaotui.config import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, holds no blocks
    RUNNING = "running"  # in the batch, holds blocks for its computed tokens
    PREEMPTED = "preempted"  # back in the queue with no blocks; recomputes its tokens when readmitted
    FINISHED_STOPPED = "finished_stopped"  # sampled an end-of-sequence token
    FINISHED_LENGTH = "finished_length"  # max_tokens or the context length reached
    FINISHED_ABORTED = "finished_aborted"  # cancelled by the caller

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset({RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                       RequestStatus.FINISHED_ABORTED})

# the strings the API reports, matching GenerationStats.finish_reason
FINISH_REASONS = {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH: "length",
                  RequestStatus.FINISHED_ABORTED: "abort"}


@dataclass(eq=False)  # identity equality: two requests with equal fields are still two requests
class Request:
    """Tokens are ``prompt_token_ids + output_token_ids``; the first ``num_computed_tokens`` of them have
    their K/V in the blocks ``block_ids`` (block ``i`` holds positions ``[i*block_size, (i+1)*block_size)``).

    EOS is never appended to the output: the request finishes instead, as in ``generate_tokens``.
    """

    request_id: str
    prompt_token_ids: Sequence[int]
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    eos_token_ids: frozenset[int] = frozenset()  # per request, so a chat template can add its end token
    arrival_time: float = field(default_factory=time.monotonic)

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    # filled in by the block manager
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # of full blocks of the tokens; survive preemption
    num_committed_blocks: int = 0  # leading blocks already registered in the prefix cache
    # statistics
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at first admission
    num_preemptions: int = 0

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)  # our own copy: the caller may reuse theirs
        self.eos_token_ids = frozenset(self.eos_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose K/V is still missing; exactly 1 for a request that is decoding."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def all_token_ids(self) -> list[int]:
        return [*self.prompt_token_ids, *self.output_token_ids]

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        """``all_token_ids[start:end]`` without building the whole list (decode asks for one token)."""
        p = len(self.prompt_token_ids)
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        if end <= p:
            return list(self.prompt_token_ids[start:end])
        return [*self.prompt_token_ids[start:], *self.output_token_ids[:end - p]]

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def finish(self, status: RequestStatus) -> None:
        assert status.finished, status
        self.status = status
        self.finish_reason = FINISH_REASONS[status]


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request: its new tokens, and whether it is done."""

    request_id: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
